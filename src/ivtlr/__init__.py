"""ivtlr: Interleaved Vision-Text Latent Reasoning for transformers vision-language models.

The public names load on first use, so that ``ivtlr --help`` and a command refusing a bad config answer without
importing torch and transformers (seconds on a small machine).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ivtlr.backbones import SUPPORTED_MODEL_TYPES, get_backbone
    from ivtlr.loading import LoadedModel, load
    from ivtlr.method.engine import IVTLR, GenerationOutput, IVTLROutput

#: public name -> the submodule that defines it
_LAZY = {"IVTLR": "method.engine", "IVTLROutput": "method.engine", "GenerationOutput": "method.engine",
         "load": "loading", "LoadedModel": "loading", "get_backbone": "backbones", "SUPPORTED_MODEL_TYPES": "backbones"}

__all__ = ["IVTLR", "IVTLROutput", "GenerationOutput", "load", "LoadedModel", "get_backbone", "SUPPORTED_MODEL_TYPES"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
