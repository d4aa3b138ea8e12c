"""``python -m deltatune.cli``: the same as the ``deltatune`` command."""

import sys

from . import main

sys.exit(main())
