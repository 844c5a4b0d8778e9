"""``python -m edgetwin``: the same as the ``edgetwin`` command."""

import sys

from edgetwin.cli import main

sys.exit(main())
