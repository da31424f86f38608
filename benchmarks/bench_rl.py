"""``python benchmarks/bench_rl.py [options]``: ``ivtlr bench rl`` (:mod:`ivtlr.bench.rl`)."""
import logging
import sys

from ivtlr.bench.rl import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main(sys.argv[1:])
