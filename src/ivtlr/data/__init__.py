"""Data: sources -> validated examples -> curriculum stage -> token batches. Knows models only through a processor."""

from ivtlr.data.collate import IGNORE_INDEX, IVTLRCollator, build_generation_batch, chat_prompt, resize_image
from ivtlr.data.curriculum import (Curriculum, CurriculumDataset, TrainingItem, answer_line, format_prompt_text,
                                   latent_plan, split_rationale, stage_for_epoch, target_text)
from ivtlr.data.example import Example, ExampleSequence, option_letter
from ivtlr.data.sources import HUB_IDS, detect_schema, load_examples

__all__ = [
    "HUB_IDS",
    "IGNORE_INDEX",
    "Curriculum",
    "CurriculumDataset",
    "Example",
    "ExampleSequence",
    "IVTLRCollator",
    "TrainingItem",
    "answer_line",
    "build_generation_batch",
    "chat_prompt",
    "detect_schema",
    "format_prompt_text",
    "latent_plan",
    "load_examples",
    "option_letter",
    "resize_image",
    "split_rationale",
    "stage_for_epoch",
    "target_text",
]
