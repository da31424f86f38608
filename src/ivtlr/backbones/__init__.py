"""Backbone adapters: pick the one that matches a model's config."""
from __future__ import annotations

from torch import nn

from .base import Backbone, Embedded, unwrap_peft
from .chameleon import ChameleonBackbone
from .qwen import QwenVLBackbone

BACKBONES: tuple[type[Backbone], ...] = (QwenVLBackbone, ChameleonBackbone)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for cls in BACKBONES for t in cls.model_types)


def backbone_class_for(model_type: str) -> type[Backbone]:
    for cls in BACKBONES:
        if model_type in cls.model_types:
            return cls
    raise ValueError(f"unsupported model type {model_type!r}: ivtlr supports {', '.join(SUPPORTED_MODEL_TYPES)}")


def get_backbone(model: nn.Module) -> Backbone:
    """The adapter for a (possibly PEFT-wrapped) transformers VLM, chosen from its config."""
    inner = unwrap_peft(model)
    return backbone_class_for(getattr(inner.config, "model_type", type(inner).__name__))(model)


__all__ = ["Backbone", "Embedded", "get_backbone", "backbone_class_for", "SUPPORTED_MODEL_TYPES",
           "QwenVLBackbone", "ChameleonBackbone", "unwrap_peft"]
