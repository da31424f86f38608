"""Batched latent generation over a split, scored and written as it goes, so an interrupted run resumes.

Each batch is prompted exactly as training prompts (``format_prompt_text`` in the chat template, then the latent
slots), decoded from the latent chain's own cache, scored, and appended to the predictions JSONL before the next
batch starts; ids already in the file are skipped. Seconds per question are a batch's wall time (prompt building
and generation) shared equally by its questions, so their sum is the run's generation time.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ivtlr.data import Example, build_generation_batch, format_prompt_text
from ivtlr.evaluation.answers import ExtractionRule
from ivtlr.evaluation.records import (PredictionRecord, accuracy_by_rule, append_jsonl, load_done_ids, read_predictions,
                                      scienceqa_context_type, summarize)
from ivtlr.loading import LoadedModel
from ivtlr.evaluation.provenance import claim_predictions, exclusive_writer

logger = logging.getLogger(__name__)

#: What accuracy is broken down by, per dataset schema (``Example.metadata["source"]``).
GROUP_KEYS = {"m3cot": ("domain", "topic"), "scienceqa": ("subject", "grade", "context_type"), "viscot": ("dataset",)}


@dataclass(frozen=True)
class GenerationSettings:
    """How each question is answered."""

    n_latent: int
    max_new_tokens: int
    image_size: int | None = None  # resize every image to this square first (what training did); None: as is


@dataclass
class Answer:
    """One generated answer."""

    text: str
    n_tokens: int  # generated ids, EOS included: the paper's "AR steps"
    selected: list[torch.Tensor]  # per latent step, the image-token indices it inserted
    latents: torch.Tensor | None = None  # (n_latent, D) the rows the latent slots received


def generate_answers(model: LoadedModel, examples: Sequence[Example], settings: GenerationSettings
                     ) -> tuple[list[Answer], dict[str, torch.Tensor]]:
    """Answer a batch of questions; also returns the model inputs (their image grids place the selections)."""
    batch = model_inputs(model, examples, settings.n_latent, settings.image_size)
    out = model.engine.generate(**batch, max_new_tokens=settings.max_new_tokens,
                                return_dict=True)
    answers = []
    for row, length, selected, latents in zip(out.sequences.tolist(), out.lengths.tolist(), out.selected,
                                              out.latents):
        text = model.tokenizer.decode(row[:length], skip_special_tokens=True)
        answers.append(Answer(text=text, n_tokens=length, selected=selected, latents=latents))
    return answers, batch


def model_inputs(model: LoadedModel, examples: Sequence[Example], n_latent: int, image_size: int | None
                 ) -> dict[str, torch.Tensor]:
    """The generation batch of ``examples`` (prompt as in training, then ``n_latent`` slots) on the model's device."""
    batch = build_generation_batch(model.processor, examples, n_latent, model.engine.latent_token_id,
                                   image_size=image_size)
    return model.place(batch)


def prediction_record(example: Example, answer: Answer, seconds: float, rule: ExtractionRule) -> PredictionRecord:
    """Score one answer, with the fields the official M3CoT scorer reads and our grouping keys."""
    meta = example.metadata
    groups: dict[str, str] = {}
    if meta.get("source") == "scienceqa":
        groups = {"subject": str(meta.get("subject") or ""), "grade": str(meta.get("grade") or ""),
                  "context_type": scienceqa_context_type({"image": example.image, "hint": meta.get("hint")})}
    return PredictionRecord.from_generation(
        id=example.id, choices=example.choices, answer=example.answer,
        question=format_prompt_text(example.question, example.choices), generated_text=answer.text,
        n_generated_tokens=answer.n_tokens, seconds=seconds, rule=rule, domain=str(meta.get("domain") or ""),
        topic=str(meta.get("topic") or ""), selected=[step.tolist() for step in answer.selected], groups=groups)


def group_keys_for(examples: Sequence[Example]) -> tuple[str, ...]:
    return GROUP_KEYS.get(examples[0].metadata.get("source"), ("domain", "topic")) if len(examples) else ()


def evaluate(model: LoadedModel, examples: Sequence[Example], predictions_path: str | Path,
             settings: GenerationSettings, *, batch_size: int, answer_rule: ExtractionRule = "original",
             progress: bool = True, provenance: Mapping[str, Any] | None = None,
             fresh: bool = False) -> list[PredictionRecord]:
    """Answer every example not yet in ``predictions_path`` and append the scored records batch by batch.

    ``provenance`` (what produces the answers: weights, data, settings) is recorded next to a new file and must match
    the record of an existing one (:mod:`ivtlr.evaluation.provenance`); ``fresh`` moves an existing file aside. One
    writer at a time: a second evaluation of the same file is refused while this one runs.
    Returns the records of all ``examples`` (those written by earlier, interrupted runs included), in file order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    predictions_path = Path(predictions_path)
    with exclusive_writer(predictions_path):
        if provenance is not None:
            claim_predictions(predictions_path, provenance, fresh=fresh)
        return answer_pending(model, examples, predictions_path, settings, batch_size, answer_rule, progress)


def answer_pending(model: LoadedModel, examples: Sequence[Example], predictions_path: Path,
                   settings: GenerationSettings, batch_size: int, answer_rule: ExtractionRule, progress: bool
                   ) -> list[PredictionRecord]:
    """Answer the ``examples`` not yet in ``predictions_path``, appending them batch by batch (no lock, no
    provenance check: :func:`evaluate` and :func:`ivtlr.evaluation.sharding.evaluate_sharded` do those)."""
    done = load_done_ids(predictions_path)
    if done:
        logger.info("%s holds %d answered questions: resuming", predictions_path, len(done))
    split_ids: set[str] = set()
    todo = max(len(examples) - len(done), 0)
    with tqdm(total=todo, desc="eval", unit="q", disable=not progress or todo == 0, dynamic_ncols=True) as bar:
        for batch in batched(_pending(examples, done, split_ids), batch_size):
            start = time.perf_counter()
            answers, _ = generate_answers(model, batch, settings)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            seconds = (time.perf_counter() - start) / len(batch)
            append_jsonl(predictions_path, [prediction_record(example, answer, seconds, answer_rule)
                                            for example, answer in zip(batch, answers)])
            bar.update(len(batch))
    return _records_of(predictions_path, split_ids)


def _pending(examples: Iterable[Example], done: set[str], seen: set[str]) -> Iterator[Example]:
    """Examples whose id is not in ``done``; every id met is added to ``seen``."""
    for example in examples:
        seen.add(example.id)
        if example.id not in done:
            yield example


def batched(examples: Iterable[Example], size: int) -> Iterator[list[Example]]:
    """Consecutive lists of ``size`` examples (the last one shorter), in order."""
    batch: list[Example] = []
    for example in examples:
        batch.append(example)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _records_of(predictions_path: str | Path, ids: set[str]) -> list[PredictionRecord]:
    """The file's records of these ids, the first one of any id written twice."""
    records: dict[str, PredictionRecord] = {}
    for record in read_predictions(predictions_path) if Path(predictions_path).exists() else []:
        if record.id in ids:
            records.setdefault(record.id, record)
    return list(records.values())


def evaluation_summary(records: Sequence[PredictionRecord], group_keys: Sequence[str], run: dict[str, Any]
                       ) -> dict[str, Any]:
    """:func:`ivtlr.evaluation.records.summarize` plus what produced the numbers and the accuracy under every answer
    rule (the run's own first)."""
    rule = run.get("answer_rule", "original")
    return {"run": dict(run), **summarize(records, group_keys), "accuracy_by_rule": accuracy_by_rule(records, rule)}
