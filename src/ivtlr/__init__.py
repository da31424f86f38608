"""ivtlr: Interleaved Vision-Text Latent Reasoning for transformers vision-language models."""
from .backbones import SUPPORTED_MODEL_TYPES, get_backbone
from .engine import IVTLR, GenerationOutput, IVTLROutput

__all__ = ["IVTLR", "IVTLROutput", "GenerationOutput", "get_backbone", "SUPPORTED_MODEL_TYPES"]
__version__ = "0.1.0"
