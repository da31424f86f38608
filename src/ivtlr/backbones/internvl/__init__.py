"""InternVL (``model_type`` internvl): the InternVL3 and InternVL3.5 "-hf" checkpoints (transformers-native)."""
from .adapter import InternVLBackbone as BACKBONE
from .processor import load_processor
from .tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
