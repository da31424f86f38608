"""Opt-in helpers for tests, the demo and the benchmarks: tiny random models of every family, built offline.

The library never imports this package: ``model: tiny:<model_type>`` in a config reaches
:func:`~ivtlr.testing.tiny.load_tiny_components` by name, as a model source (``ivtlr.modeling.model_source``), the way
a third-party plugin registered under the ``ivtlr.model_sources`` entry-point group would.
"""
from ivtlr.testing.tiny import (FAMILIES, LATENT_TOKENS, TinyBundle, build_processor, build_tiny, build_tokenizer,
                                make_test_image)

__all__ = ["FAMILIES", "LATENT_TOKENS", "TinyBundle", "build_processor", "build_tiny", "build_tokenizer",
           "make_test_image"]
