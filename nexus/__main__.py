"""``python -m nexus`` is the ``nexus`` command."""

import sys

from nexus.cli import main

sys.exit(main())
