"""Sharded evaluation: ``accelerate launch [--num_processes N] -m ivtlr eval CONFIG ...`` splits the questions.

With one process nothing here runs (unless parts of an earlier sharded run are left, see below): the predictions
file is written batch by batch as :func:`ivtlr.evaluation.runner.evaluate` does. With N processes:

1. the main process takes the predictions file's lock, folds in any part files an interrupted run left (of any
   process count: their answers are kept, never redone) and checks or records the provenance, as a one-process
   run does; the other processes wait, and all stop with it if it refuses;
2. every process reads the questions the predictions file does not answer yet (the same list in each), cut into
   batches of ``eval.batch_size`` in question order, and takes its contiguous share of those batches
   (``PartialState.split_between_processes``): a fresh run answers in exactly the batches a one-process run does;
3. each process appends its answers, batch by batch and fsynced, to its own part file next to the predictions
   (``predictions_<stem>.part-<i>-of-<N>.jsonl``), so an interrupted part resumes after its last whole line;
4. after ``wait_for_everyone`` the main process merges the parts into the predictions file in question order,
   atomically (a temporary sibling, then a rename), removes the parts, and writes the summary as a one-process run.

A relaunch, with the same or another number of processes (one included), merges what the parts hold first, then
shares out only the questions still unanswered.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ivtlr.errors import UserError
from ivtlr.evaluation.provenance import claim_predictions, exclusive_writer
from ivtlr.evaluation.records import PredictionRecord, load_done_ids, read_jsonl
from ivtlr.evaluation.runner import answer_pending
from ivtlr.files import write_text_atomically

if TYPE_CHECKING:
    from accelerate import PartialState

    from ivtlr.data import Example
    from ivtlr.evaluation.answers import ExtractionRule
    from ivtlr.evaluation.runner import GenerationSettings
    from ivtlr.loading import LoadedModel

logger = logging.getLogger(__name__)


def part_path(predictions: Path, index: int, count: int) -> Path:
    """Where process ``index`` of ``count`` writes its answers: next to the predictions file."""
    return predictions.with_name(f"{predictions.name.removesuffix('.jsonl')}.part-{index}-of-{count}.jsonl")


def part_files(predictions: Path) -> list[Path]:
    """The part files next to ``predictions`` (of any process count), by count then index."""
    if not predictions.parent.is_dir():
        return []
    pattern = re.compile(re.escape(predictions.name.removesuffix(".jsonl")) + r"\.part-(\d+)-of-(\d+)\.jsonl")
    found = [(int(match[2]), int(match[1]), path) for path in predictions.parent.iterdir()
             if (match := pattern.fullmatch(path.name)) and path.is_file()]
    return [path for _, _, path in sorted(found)]


def merge_parts(predictions: Path, order: Sequence[str]) -> int:
    """Fold the part files next to ``predictions`` into it and remove them; returns how many answers they added.

    The merged file holds the first record of every id (those already in ``predictions`` first, then the parts'),
    in the order of ``order`` (the split's question ids); ids the split does not hold keep their place after them.
    It replaces ``predictions`` in one step, and the parts are removed only after that: a crash in between leaves
    answers that the next merge finds twice and keeps once. No parts: nothing is read or written.
    """
    parts = part_files(predictions)
    if not parts:
        return 0
    merged: dict[str, dict[str, Any]] = {}
    for source in [predictions, *parts]:
        if source.exists():
            for flat in read_jsonl(source):
                merged.setdefault(str(flat["id"]), flat)
        if source == predictions:
            kept = len(merged)
    position: dict[str, int] = {}
    for index, question_id in enumerate(order):
        position.setdefault(question_id, index)
    ordered = sorted(merged.values(), key=lambda flat: position.get(str(flat["id"]), len(order)))
    write_text_atomically(predictions, "".join(json.dumps(flat, ensure_ascii=False) + "\n" for flat in ordered))
    for part in parts:
        part.unlink()
    added = len(merged) - kept
    logger.info("merged %d answers from %s into %s", added, ", ".join(part.name for part in parts), predictions)
    return added


def share_of(examples: Sequence[Example], done: set[str], batch_size: int, state: PartialState) -> list[Example]:
    """This process's questions: the unanswered ones, cut into batches in question order, then a contiguous run of
    those batches per process (the first processes take one batch more when they do not divide evenly)."""
    pending = [example for example in examples if example.id not in done]
    batches = [pending[start:start + batch_size] for start in range(0, len(pending), batch_size)]
    with state.split_between_processes(batches) as mine:
        return [example for batch in mine for example in batch]


def ordered_records(predictions: Path, order: Sequence[str]) -> list[PredictionRecord]:
    """The predictions file's records of the ids in ``order``, the first one of each id, in that order."""
    records: dict[str, PredictionRecord] = {}
    wanted = set(order)
    for flat in read_jsonl(predictions) if predictions.exists() else []:
        if str(flat["id"]) in wanted:
            records.setdefault(str(flat["id"]), PredictionRecord.from_dict(flat))
    return [records[question_id] for question_id in dict.fromkeys(order) if question_id in records]


def evaluate_sharded(model: LoadedModel, examples: Sequence[Example], predictions_path: str | Path,
                     settings: GenerationSettings, *, state: PartialState, batch_size: int,
                     answer_rule: ExtractionRule = "original", progress: bool = True,
                     provenance: Mapping[str, Any] | None = None, fresh: bool = False
                     ) -> list[PredictionRecord] | None:
    """:func:`ivtlr.evaluation.runner.evaluate` shared out between ``state``'s processes (every one calls it).

    Returns, on the main process, the records of all ``examples`` in question order once the parts are merged;
    ``None`` on the others. The main process holds the predictions file's lock throughout, so a second evaluation of
    the same file is refused while this one runs, whatever its number of processes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    predictions = Path(predictions_path)
    order = [example.id for example in examples]
    with ExitStack() as main_only:
        def prepare() -> None:
            main_only.enter_context(exclusive_writer(predictions))
            merge_parts(predictions, order)  # before the claim: a --fresh run moves their answers aside with the rest
            if provenance is not None:
                claim_predictions(predictions, provenance, fresh=fresh)

        _on_main_process_first(state, prepare)
        done = load_done_ids(predictions)
        share = share_of(examples, done, batch_size, state)
        part = part_path(predictions, state.process_index, state.num_processes)
        logger.info("process %d of %d: %d of the %d unanswered questions -> %s", state.process_index,
                    state.num_processes, len(share), len(set(order) - done), part.name)
        answer_pending(model, share, part, settings, batch_size, answer_rule, progress and state.is_main_process)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        merge_parts(predictions, order)
        return ordered_records(predictions, order)


def _on_main_process_first(state: PartialState, action: Callable[[], None]) -> None:
    """Run ``action`` on the main process while the others wait; if it fails, every process stops (the main one
    with its error, the others quietly, with the exit status a user error or a crash gets) instead of waiting."""
    from accelerate.utils import broadcast_object_list

    failure: Exception | None = None
    if state.is_main_process:
        try:
            action()
        except Exception as error:  # noqa: BLE001 - re-raised below, once the others know
            failure = error
    if state.num_processes > 1:
        outcome = [None if failure is None else ("user" if isinstance(failure, UserError) else "crash")]
        broadcast_object_list(outcome, from_process=0)
        if outcome[0] is not None and not state.is_main_process:
            raise SystemExit(2 if outcome[0] == "user" else 1)
    if failure is not None:
        raise failure
