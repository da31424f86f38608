"""Qwen2-VL / Qwen2.5-VL processors without torchvision (the stock one builds a video processor that needs it)."""
from __future__ import annotations

from transformers import ProcessorMixin, Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor, which cannot be built without torchvision.

    Declaring only `image_processor` and `tokenizer` in `__init__` is what makes `ProcessorMixin` save, load
    and validate exactly those two parts; everything else (placeholder expansion, `mm_token_type_ids`, chat
    templates) is the stock Qwen2-VL behaviour.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def load_processor(name_or_path: str, **kwargs) -> ProcessorMixin:
    return ImageOnlyQwen2VLProcessor.from_pretrained(name_or_path, **kwargs)
