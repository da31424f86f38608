"""The method: IVT-LR's latent chain over a transformers VLM.

``engine`` (the :class:`~ivtlr.method.engine.IVTLR` module) runs the cached chain; ``chain``, ``layout``,
``attention_rows``, ``selection``, ``interventions`` and ``outputs`` are its parts; ``recompute`` is the
original algorithm's whole-sequence reference the engine is held to; ``loss`` and ``supervision`` are the
objectives. Nothing is imported here, so that
reading a config (which needs ``modes``) does not load torch.
"""
