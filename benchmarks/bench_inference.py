"""``python benchmarks/bench_inference.py [options]``: ``ivtlr bench inference`` (:mod:`ivtlr.bench.inference`)."""
import logging
import sys

from ivtlr.bench.inference import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main(sys.argv[1:])
