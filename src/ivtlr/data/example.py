"""One multiple-choice question about an image, in the form every later stage of the pipeline reads."""

from __future__ import annotations

import io
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, overload

import numpy as np
from PIL import Image

OPTION_LETTERS = string.ascii_uppercase

#: A region of the picture, (x0, y0, x1, y1) in pixels of the image as stored (x right, y down, x0 < x1, y0 < y1).
Box = tuple[float, float, float, float]


class InvalidExample(ValueError):
    """A row that cannot become a correct `Example`: `reason` names the kind of defect (skips are counted by it)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    """A validated sample: `answer` is always one of the option letters of `choices`."""

    id: str
    image: Image.Image | None
    question: str
    choices: list[str]
    answer: str
    rationale: str
    metadata: dict[str, Any] = field(default_factory=dict)
    #: per reasoning step (the steps ``split_rationale`` makes of ``rationale``), the region of the picture it reads,
    #: or None for a step that reads none; None when the data names no regions (region supervision uses them)
    step_boxes: tuple[Box | None, ...] | None = None

    @property
    def answer_index(self) -> int:
        return OPTION_LETTERS.index(self.answer)

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer_index]


def option_letter(index: int) -> str:
    """Letter of the `index`-th option ("A" for 0); the prompt and the scorer both name options this way."""
    if not 0 <= index < len(OPTION_LETTERS):
        raise ValueError(f"option index {index} has no letter (at most {len(OPTION_LETTERS)} options)")
    return OPTION_LETTERS[index]


def decode_image(encoded: bytes) -> Image.Image:
    """Fully decode an encoded image to RGB; transparent pixels are shown over white, as a viewer would, and
    high-bit-depth gray by its real range (:func:`to_8_bit`)."""
    image = to_8_bit(Image.open(io.BytesIO(encoded)))
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_8_bit(image: Image.Image) -> Image.Image:
    """High-bit-depth gray as 8-bit gray (``L``) by its real range; other modes unchanged.

    PIL's ``convert("RGB")`` clips these values at 255, so a 16-bit scan comes out almost all white. Integer modes
    (``I;16*``, and ``I``, which 16-bit PNG and TIFF files open as) are read as 16-bit: 0..65535 -> 0..255, values
    outside clipped. Float (``F``) is read as 0..1 when every value lies in [0, 1], else as 0..255 (clipped); NaN is
    black.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64) / 257
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255
    else:
        return image
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode L


class ExampleSequence(Sequence[Example]):
    """Examples whose images stay encoded until accessed.

    A decoded M3CoT training split would hold several GB of pixels; the encoded bytes are a fraction of
    that, and each access decodes a fresh image that is freed once the batch is built.
    """

    def __init__(self, records: list[Example], encoded_images: list[bytes | None]):
        if len(records) != len(encoded_images):
            raise ValueError("every record needs exactly one encoded image (or None)")
        self._records = records
        self._encoded_images = encoded_images

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> ExampleSequence: ...

    def __getitem__(self, index: int | slice) -> Example | ExampleSequence:
        if isinstance(index, slice):
            return ExampleSequence(self._records[index], self._encoded_images[index])
        encoded = self._encoded_images[index]
        image = None if encoded is None else decode_image(encoded)
        return replace(self._records[index], image=image)

    def __iter__(self) -> Iterator[Example]:
        for index in range(len(self)):
            yield self[index]
