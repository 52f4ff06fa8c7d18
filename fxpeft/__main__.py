"""``python -m fxpeft check BASE ADAPTER``: the command line of :mod:`fxpeft.cli`."""

import sys

from fxpeft.cli import main

sys.exit(main())
