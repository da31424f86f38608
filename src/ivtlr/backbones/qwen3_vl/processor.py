"""Qwen3-VL's processor without torchvision (the stock one builds a video processor that needs it)."""
from __future__ import annotations

from transformers import ProcessorMixin, Qwen3VLProcessor


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without its video processor, which cannot be built without torchvision.

    Declaring only `image_processor` and `tokenizer` in `__init__` is what makes `ProcessorMixin` save, load
    and validate exactly those two parts; everything else (placeholder expansion, `mm_token_type_ids`, chat
    templates) is the stock Qwen3-VL behaviour. Qwen3-VL's image processor is Qwen2-VL's (patch 16, merge 2);
    without torchvision the auto classes give its PIL variant.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


def load_processor(name_or_path: str, **kwargs) -> ProcessorMixin:
    return ImageOnlyQwen3VLProcessor.from_pretrained(name_or_path, **kwargs)
