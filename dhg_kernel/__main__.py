"""``python -m dhg_kernel install|uninstall``: the kernelspec for Jupyter."""

import sys

from .kernelspec import main

sys.exit(main())
