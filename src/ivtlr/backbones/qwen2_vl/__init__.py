"""Qwen2-VL and Qwen2.5-VL (``model_type`` qwen2_vl, qwen2_5_vl)."""
from ivtlr.backbones.qwen2_vl.adapter import QwenVLBackbone as BACKBONE
from ivtlr.backbones.qwen2_vl.processor import load_processor
from ivtlr.backbones.qwen2_vl.tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
