"""``python -m wsitools`` runs the command line."""

import sys

from wsitools.cli import main

sys.exit(main())
