"""``python -m portbroker``: the ``portbroker`` command (where no script is on PATH)."""

import sys

from portbroker.cli import main

sys.exit(main())
