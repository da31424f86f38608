"""The embedded demo (``ivtlr demo``): a tiny model trained on bundled real digit scans, every variant of the paper
scored on a CPU in minutes. An application of the library, never imported by it."""
