"""``python -m pykd``: the pykd command line (see :mod:`pykd.cli`)."""
import sys

from .cli import main

sys.exit(main())
