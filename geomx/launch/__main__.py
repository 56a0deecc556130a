"""``python -m geomx.launch``."""

import sys

from .cli import main

sys.exit(main())
