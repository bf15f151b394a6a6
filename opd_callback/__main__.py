"""``python -m opd_callback``: the ``opd-diagnose`` command line (see :mod:`opd_callback.cli`)."""

import sys

from opd_callback.cli import main

if __name__ == "__main__":
    sys.exit(main())
