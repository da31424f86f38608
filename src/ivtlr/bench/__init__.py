"""Benchmarks (``ivtlr bench NAME``): each prints a table and writes JSON (default ``benchmarks/results/NAME.json``
under the current folder). A tool built on the library, like the demo: the library never imports it."""
