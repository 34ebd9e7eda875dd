"""``python -m fastpref.evaluate`` (``accelerate launch -m fastpref.evaluate``): ``fastpref eval``."""

import sys

from .cli import main

sys.exit(main())
