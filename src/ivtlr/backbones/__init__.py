"""Backbone adapters: everything family-specific, one folder per family (see :mod:`ivtlr.backbones.registry`).

The adapter classes load on first use, so that the family names (``SUPPORTED_MODEL_TYPES``) can check a config before
torch and transformers are imported.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ivtlr.backbones.registry import FAMILIES

if TYPE_CHECKING:
    from torch import nn
    from transformers import ProcessorMixin

    from ivtlr.backbones.base import Backbone, Embedded, RegionView, box_token_mask, unwrap_peft
    from ivtlr.backbones.tiny_specs import TinySpec

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for types in FAMILIES.values() for t in types)

#: public name -> the submodule that defines it
_LAZY = {"Backbone": "base", "Embedded": "base", "RegionView": "base", "box_token_mask": "base",
         "unwrap_peft": "base", "TinySpec": "tiny_specs"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


def check_tiny_family(model: str) -> None:
    """Refuse ``tiny:<family>`` naming no supported family, before torch loads (the test builders would find out only
    after importing transformers)."""
    from ivtlr.errors import UnsupportedModelSetting

    family = model.removeprefix("tiny:") if model.startswith("tiny:") else None
    if family is not None and family not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelSetting(f"unknown tiny model family {family!r}: use tiny:<family> with one of "
                                      f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def family_module(model_type: str) -> ModuleType:
    """The family folder that handles ``model_type``."""
    for family, types in FAMILIES.items():
        if model_type in types:
            return importlib.import_module(f"{__name__}.{family}")
    raise ValueError(f"unsupported model type {model_type!r}: ivtlr supports {', '.join(SUPPORTED_MODEL_TYPES)}")


def backbone_class_for(model_type: str) -> type[Backbone]:
    return family_module(model_type).BACKBONE


def load_processor(name_or_path: str, model_type: str, **kwargs) -> ProcessorMixin:
    """The processor of a checkpoint of ``model_type`` (the family's own class where the stock one cannot load
    here, e.g. without torchvision)."""
    return family_module(model_type).load_processor(name_or_path, **kwargs)


def tiny_spec(model_type: str) -> TinySpec:
    """How the test builders make a tiny model of ``model_type``."""
    tiny = family_module(model_type).TINY
    if model_type not in tiny:
        raise ValueError(f"no tiny model of {model_type!r} in its family folder")
    return tiny[model_type]


def get_backbone(model: nn.Module) -> Backbone:
    """The adapter for a (possibly PEFT-wrapped) transformers VLM, chosen from its config."""
    from ivtlr.backbones.base import unwrap_peft

    inner = unwrap_peft(model)
    return backbone_class_for(getattr(inner.config, "model_type", type(inner).__name__))(model)


__all__ = ["Backbone", "Embedded", "RegionView", "SUPPORTED_MODEL_TYPES", "TinySpec", "backbone_class_for",
           "box_token_mask", "check_tiny_family", "family_module", "get_backbone", "load_processor", "tiny_spec",
           "unwrap_peft"]
