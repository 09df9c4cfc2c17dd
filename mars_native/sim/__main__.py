"""``python -m mars_native.sim`` = ``mars-native simulate``."""

import sys

from .cli import main

sys.exit(main())
