"""``python benchmarks/bench_scaling.py [options]``: ``ivtlr bench scaling`` (:mod:`ivtlr.bench.scaling`)."""
import logging
import sys

from ivtlr.bench.scaling import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main(sys.argv[1:])
