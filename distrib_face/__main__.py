"""``python -m distrib_face`` is the same as ``distrib-face``."""

import sys

from distrib_face.cli import main

sys.exit(main())
