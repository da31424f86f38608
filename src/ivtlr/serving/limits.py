"""What one server accepts: sizes, counts and which image sources, each with a default that suits a single GPU."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 20 * 2**20  # a request's JSON, base64 images included
    max_image_pixels: int = 4096 * 4096  # width x height of a decoded image
    max_prompt_tokens: int = 4096  # the encoded prompt, image tokens and latent slots included
    max_tokens: int = 1024  # the largest ``max_tokens`` a request may ask for
    default_max_tokens: int = 64  # when a request does not say
    max_active: int = 32  # requests advanced together in one batch
    max_queue: int = 256  # requests waiting for a place in the batch; beyond: 429
    local_image_dir: Path | None = None  # ``file://`` images allowed under this directory only (off: None)
    allow_remote_images: bool = False  # ``http(s)://`` images fetched by the server (off by default)
    remote_timeout_s: float = 10.0
