"""InternVL (``model_type`` internvl): the InternVL3 and InternVL3.5 "-hf" checkpoints (transformers-native)."""
from ivtlr.backbones.internvl.adapter import InternVLBackbone as BACKBONE
from ivtlr.backbones.internvl.processor import load_processor
from ivtlr.backbones.internvl.tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
