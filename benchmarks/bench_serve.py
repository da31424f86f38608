"""``python benchmarks/bench_serve.py [options]``: ``ivtlr bench serve`` (:mod:`ivtlr.bench.serve`)."""
import logging
import sys

from ivtlr.bench.serve import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main(sys.argv[1:])
