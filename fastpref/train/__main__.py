"""``python -m fastpref.train`` and ``accelerate launch -m fastpref.train``."""

import sys

from .cli import main

sys.exit(main())
