"""LLaVA-OneVision's processor without torchvision (the stock one builds a video processor that needs it)."""
from __future__ import annotations

from transformers import LlavaOnevisionProcessor, ProcessorMixin


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without its video processor, which cannot be built without torchvision.

    Declaring only `image_processor` and `tokenizer` as parts in `__init__` is what makes `ProcessorMixin` save,
    load and validate exactly those two; the placeholder expansion (``<image>`` -> base view + unpadded anyres grid
    + one newline per grid row, from `image_sizes`) and the chat template are the stock behaviour.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int | None = None,
                 vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
                 image_token: str = "<image>", video_token: str = "<video>",
                 vision_aspect_ratio: str = "anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)


def load_processor(name_or_path: str, **kwargs) -> ProcessorMixin:
    return ImageOnlyLlavaOnevisionProcessor.from_pretrained(name_or_path, **kwargs)
