"""The supported families: one line each. A family is a folder of ``ivtlr.backbones`` whose ``__init__`` exports
``BACKBONE`` (a :class:`~ivtlr.backbones.base.Backbone` subclass), ``load_processor(name_or_path, **kwargs)`` and
``TINY`` (model type -> :class:`~ivtlr.backbones.tiny_specs.TinySpec`). Folders are imported when first needed."""
from __future__ import annotations

#: family folder -> the transformers ``model_type`` values it handles.
FAMILIES: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("qwen2_vl", "qwen2_5_vl"),
    "chameleon": ("chameleon",),
    "internvl": ("internvl",),
    "llava_onevision": ("llava_onevision",),
    "qwen3_vl": ("qwen3_vl",),
}
