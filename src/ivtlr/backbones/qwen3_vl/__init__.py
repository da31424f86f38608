"""Qwen3-VL (``model_type`` qwen3_vl): Qwen3-VL-2B/4B/8B-Instruct, deepstack included."""
from ivtlr.backbones.qwen3_vl.adapter import Qwen3VLBackbone as BACKBONE
from ivtlr.backbones.qwen3_vl.processor import load_processor
from ivtlr.backbones.qwen3_vl.tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
