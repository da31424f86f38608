"""Chameleon (``model_type`` chameleon): images as VQ codes in the text vocabulary."""
from .adapter import ChameleonBackbone as BACKBONE
from .processor import load_processor
from .tiny import TINY

__all__ = ["BACKBONE", "TINY", "load_processor"]
