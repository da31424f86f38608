"""``ivtlr serve``: an OpenAI-compatible HTTP server over the cached engine, with step-level continuous batching.

``app`` holds the routes (FastAPI), ``requests`` turns a chat request into a prompt and checks it against the
``limits``, ``images`` reads ``image_url`` parts, ``worker`` runs the :class:`~ivtlr.method.live.LiveBatch` in one
thread, ``metrics`` counts for Prometheus, and ``cli`` starts it under uvicorn.
"""
