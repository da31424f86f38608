"""LLaVA-OneVision (``model_type`` llava_onevision): SigLIP views packed by anyres, with a newline row per grid row."""
from .adapter import LlavaOnevisionBackbone as BACKBONE
from .processor import load_processor
from .tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
