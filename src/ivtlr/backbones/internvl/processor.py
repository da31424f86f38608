"""InternVL's processor without torchvision, one tile per image.

The stock `InternVLProcessor` builds a video processor (which needs torchvision) and always tiles images
(``crop_to_patches``: several tiles plus a thumbnail, by aspect ratio). IVT-LR selects patches on one image-token
grid and the data pipeline resizes every image to a square ``image_size`` first, so this variant turns tiling off:
each image is one tile of the image processor's size, whose tokens form one square grid (what ``--explain``
draws). A square image of the tile size is one tile under stock tiling too, so nothing else changes.
"""
from __future__ import annotations

from transformers import InternVLProcessor, ProcessorMixin


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """`InternVLProcessor` with an image processor and a tokenizer only, and one tile per image.

    Declaring only ``image_processor`` and ``tokenizer`` in ``__init__`` makes `ProcessorMixin` save, load and
    validate exactly those parts; placeholder expansion (``<IMG_CONTEXT>`` -> ``<img>`` + one context token per
    image token + ``</img>``) and chat templates are the stock InternVL behaviour. ``crop_to_patches=True`` passed
    at call time still tiles (the engine handles it; drawing does not).
    """

    images_kwargs = {"crop_to_patches": False}

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256,
                 chat_template: str | None = None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


def load_processor(name_or_path: str, **kwargs) -> ProcessorMixin:
    return ImageOnlyInternVLProcessor.from_pretrained(name_or_path, **kwargs)
