"""Qwen3-VL (``model_type`` qwen3_vl): Qwen3-VL-2B/4B/8B-Instruct, deepstack included."""
from .adapter import Qwen3VLBackbone as BACKBONE
from .processor import load_processor
from .tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
