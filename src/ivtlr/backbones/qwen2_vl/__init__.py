"""Qwen2-VL and Qwen2.5-VL (``model_type`` qwen2_vl, qwen2_5_vl)."""
from .adapter import QwenVLBackbone as BACKBONE
from .processor import load_processor
from .tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
