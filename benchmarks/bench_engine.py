"""``python benchmarks/bench_engine.py [options]``: the same as ``ivtlr bench engine`` (:mod:`ivtlr.bench.engine`)."""
import logging
import sys

from ivtlr.bench.engine import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main(sys.argv[1:])
