"""``python -m hl7relay``: the same as the ``hl7relay`` command."""

import sys

from hl7relay.cli import main

sys.exit(main())
