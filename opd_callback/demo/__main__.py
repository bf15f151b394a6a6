"""``python -m opd_callback.demo``: the toy-lab demo (see :mod:`opd_callback.demo`)."""

import sys

from opd_callback.demo import main

sys.exit(main())
