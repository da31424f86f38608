"""The questions ``ivtlr eval`` answers, as documents an evaluation harness sends to ``ivtlr serve``, and their scoring.

A harness task names its questions the way an ivtlr config does (a dataset section, or a whole config file); they are
loaded by ``ivtlr eval``'s own loader, so the harness sees the same rows (invalid and image-less ones skipped alike),
the same question text (context prepended or not) and the same picture, decoded to RGB exactly as ``ivtlr eval``
decodes it and stored losslessly (PNG). The prompt is :func:`ivtlr.data.format_prompt_text`, which the server takes
as it is when a request carries no ``ivtlr.choices``, so it encodes the tokens ``ivtlr eval`` encodes. Answers are
scored by :func:`ivtlr.evaluation.answers.is_correct` under every answer rule, as the eval summary's
``accuracy_by_rule`` is.

Nothing here imports a harness: :mod:`ivtlr.harness.lmms_task` wraps these functions for lmms-eval.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
from PIL import Image

from ivtlr.config import Config, ConfigError, load_config
from ivtlr.data import format_prompt_text
from ivtlr.evaluation.answers import EXTRACTION_RULES, is_correct

#: The metric a harness reports per answer rule (the keys of the eval summary's ``accuracy_by_rule``).
METRICS: dict[str, str] = {rule: f"accuracy_{rule}" for rule in EXTRACTION_RULES}

#: What a task may say about its questions besides the source: the keys of an ivtlr config's ``dataset`` section.
DATASET_KEYS = ("data_files", "use_context", "keep_no_image", "limit")

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "question": datasets.Value("string"),
    "choices": datasets.List(datasets.Value("string")),
    "answer": datasets.Value("string"),
    "image": datasets.Image(),
    "domain": datasets.Value("string"),
    "topic": datasets.Value("string"),
})


def task_config(source: str | None, split: str, options: Mapping[str, Any] | None = None) -> Config:
    """The ivtlr config whose ``ivtlr eval`` questions a task asks: split ``split`` of ``source`` (``digits``,
    ``m3cot``, ``scienceqa``, ``auto`` or a hub id) with ``options`` (:data:`DATASET_KEYS`), or, when ``options``
    has ``config`` (a config file, with optional ``overrides`` as on the command line), that config as it is."""
    options = dict(options or {})
    if "config" in options:
        unknown = sorted(set(options) - {"config", "overrides"})
        if unknown:
            raise ConfigError(f"a task that names an ivtlr config takes only `overrides` beside it, not {unknown}: "
                              "set them in the config or as overrides (e.g. dataset.limit=50)")
        overrides = options.get("overrides") or []
        if isinstance(overrides, str):
            overrides = [overrides]
        return load_config(options["config"], [str(override) for override in overrides])
    unknown = sorted(set(options) - set(DATASET_KEYS))
    if unknown:
        raise ConfigError(f"unknown dataset options {unknown}; a task takes {list(DATASET_KEYS)}, or `config`")
    if not source:
        raise ConfigError("a task needs its questions' source (dataset_path: digits, m3cot, a hub id, ...)")
    return Config.from_dict({"dataset": {"source": source, "eval_split": split, **options}}).check_values()


def question_docs(config: Config) -> datasets.Dataset:
    """The questions of ``ivtlr eval`` with ``config`` (its ``dataset`` section, split ``dataset.eval_split``), in
    its order: id, question, choices, answer (the gold letter), image (RGB as ``ivtlr eval`` decodes it, or None),
    and the M3CoT grouping keys domain and topic."""
    from ivtlr.evaluation.cli import load_eval_examples

    columns: dict[str, list] = {name: [] for name in FEATURES}
    for example in load_eval_examples(config):  # each access decodes that question's picture, as eval does
        columns["id"].append(example.id)
        columns["question"].append(example.question)
        columns["choices"].append(list(example.choices))
        columns["answer"].append(example.answer)
        columns["image"].append(None if example.image is None else {"bytes": _png(example.image), "path": None})
        columns["domain"].append(str(example.metadata.get("domain") or ""))
        columns["topic"].append(str(example.metadata.get("topic") or ""))
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Any = None) -> str:
    """The prompt text ``ivtlr eval`` gives the question: "[Question]:...[Options]:\\n(A)....Answer:\\n"."""
    return format_prompt_text(doc["question"], list(doc["choices"]))


def doc_to_visual(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Any = None) -> list[Image.Image]:
    """The question's picture (RGB, the pixels ``ivtlr eval`` reads), or none."""
    image = doc.get("image")
    return [] if image is None else [image.convert("RGB")]


def doc_to_target(doc: Mapping[str, Any]) -> str:
    return doc["answer"]


def score(doc: Mapping[str, Any], generated_text: str) -> dict[str, float]:
    """1.0 or 0.0 per metric of :data:`METRICS`: whether each answer rule reads the gold letter in the answer."""
    prompt = doc_to_text(doc)
    return {METRICS[rule]: float(is_correct(prompt, generated_text, list(doc["choices"]), doc["answer"], rule))
            for rule in EXTRACTION_RULES}


def process_results(doc: Mapping[str, Any], results: Sequence[str], **_: Any) -> dict[str, float]:
    """lmms-eval's hook: ``results`` holds the one generated answer."""
    return score(doc, results[0] if results else "")
