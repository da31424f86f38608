"""Chameleon's processor, keeping its chat template through save/load (the stock `__init__` drops it)."""
from __future__ import annotations

from transformers import ChameleonProcessor, ProcessorMixin


class ChameleonChatProcessor(ChameleonProcessor):
    """`ChameleonProcessor` that keeps its chat template through save/load."""

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


def load_processor(name_or_path: str, **kwargs) -> ProcessorMixin:
    return ChameleonChatProcessor.from_pretrained(name_or_path, **kwargs)
