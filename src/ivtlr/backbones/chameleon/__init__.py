"""Chameleon (``model_type`` chameleon): images as VQ codes in the text vocabulary."""
from ivtlr.backbones.chameleon.adapter import ChameleonBackbone as BACKBONE
from ivtlr.backbones.chameleon.processor import load_processor
from ivtlr.backbones.chameleon.tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
