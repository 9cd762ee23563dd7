"""Audit hl7apy's definitions of every HL7 version we support, and say how each finding is handled.

    python bench/audit_hl7apy.py [--all]

Prints the findings that are not handled (and, with --all, every finding with how our corrections
deal with it: hl7relay/validation/corrections.py). Exit status 1 when any finding is not handled,
so a new hl7apy release with new mistakes is noticed (tests/test_validation.py runs the same audit).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from hl7relay.validation.audit import audit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also list the findings our corrections handle")
    args = parser.parse_args(argv)
    findings = audit()
    for finding in findings:
        if args.all or not finding.handled:
            print(finding)
    counts = Counter((f.kind, bool(f.handled)) for f in findings)
    summary = ", ".join(f"{kind}: {counts[(kind, True)]} handled, {counts[(kind, False)]} not"
                        for kind in ("numbering", "type", "required-nte", "choice"))
    print(f"{len(findings)} findings ({summary})")
    return 1 if any(not f.handled for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
