"""One vocabulary: every message status, delivery status and ACK code comes from hl7relay.outcomes
(MessageStatus, DeliveryStatus, AckCode, NOT_STORED); no module spells one out as a literal, so a
renamed or added status cannot be missed in a corner (issue #24, step 5)."""

import ast
from pathlib import Path

from hl7relay.outcomes import NOT_STORED, AckCode, DeliveryStatus, MessageStatus

REPO = Path(__file__).resolve().parent.parent
WORDS = {*(s.value for s in MessageStatus), *(s.value for s in DeliveryStatus), *(c.value for c in AckCode), NOT_STORED}
# the same spellings in other vocabularies: not our statuses
ELSEWHERE = {
    ("engine/validation/profile.py", "WITHDRAWN"): "an HL7 field withdrawn from the standard (usage WD)",
    ("engine/simulate.py", "CE"): "the HL7 data type CE (coded element)",
}


def literals(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    names = set()  # the strings of __all__ are names (trip.PROCESSED is a stage), not statuses
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names |= {id(element) for element in ast.walk(node.value)}
    for node in ast.walk(tree):
        if id(node) in names:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            value = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            if value in WORDS:
                yield node.lineno, value


def test_no_status_or_ack_code_is_spelt_out_outside_the_vocabulary():
    found = []
    for folder in ("engine", "ack", "transformers"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative == "engine/outcomes.py":
                continue
            found += [f"{relative}:{line}: {value!r}" for line, value in literals(path)
                      if (relative, value) not in ELSEWHERE]
    assert not found, "use hl7relay.outcomes instead of literals:\n" + "\n".join(found)


def test_the_pipeline_result_is_the_stored_status():
    from hl7relay.channels.pipeline import Result

    assert Result is MessageStatus
