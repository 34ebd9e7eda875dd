"""Benchmark of the fastpref loss: ``python benchmarks/bench_loss.py [--quick]``.

The code lives in ``fastpref/bench.py`` so that ``fastpref bench`` runs the same thing from any
install; see its docstring for what is measured and how.
"""

import sys

from fastpref.bench import main

if __name__ == "__main__":
    sys.exit(main())
