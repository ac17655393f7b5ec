"""``python -m fedge``."""

import sys

from fedge.cli import main

sys.exit(main())
