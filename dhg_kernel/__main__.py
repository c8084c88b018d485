"""``python -m dhg_kernel``: the same command line as ``dhvm``."""

import sys

from .cli import main

sys.exit(main())
