"""LLaVA-OneVision (``model_type`` llava_onevision): SigLIP views packed by anyres, with a newline row per grid row."""
from ivtlr.backbones.llava_onevision.adapter import LlavaOnevisionBackbone as BACKBONE
from ivtlr.backbones.llava_onevision.processor import load_processor
from ivtlr.backbones.llava_onevision.tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
