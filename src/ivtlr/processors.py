"""Processors that work without torchvision and keep their chat templates through save/load.

Loading a processor for a model directory or hub id goes through :func:`load_processor`, which picks the right
class for the model family (the stock ``AutoProcessor`` for Qwen2-VL needs torchvision for its video part).
"""
from __future__ import annotations

from transformers import ChameleonProcessor, ProcessorMixin, Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor, which cannot be built without torchvision.

    Declaring only `image_processor` and `tokenizer` in `__init__` is what makes `ProcessorMixin` save, load
    and validate exactly those two parts; everything else (placeholder expansion, `mm_token_type_ids`, chat
    templates) is the stock Qwen2-VL behaviour.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


class ChameleonChatProcessor(ChameleonProcessor):
    """`ChameleonProcessor` that keeps its chat template through save/load (the stock `__init__` drops it)."""

    def __init__(
        self,
        image_processor,
        tokenizer,
        image_seq_length: int = 1024,
        image_token: str = "<image>",
        chat_template: str | None = None,
    ):
        super().__init__(image_processor, tokenizer, image_seq_length=image_seq_length, image_token=image_token)
        self.chat_template = chat_template


def load_processor(name_or_path: str, model_type: str, **kwargs) -> ProcessorMixin:
    """The processor of a Qwen2-VL / Qwen2.5-VL (image-only) or Chameleon checkpoint."""
    cls = ChameleonChatProcessor if model_type == "chameleon" else ImageOnlyQwen2VLProcessor
    return cls.from_pretrained(name_or_path, **kwargs)
