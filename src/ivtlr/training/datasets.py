"""What a training run reads, and in which order each process reads it.

The order of an epoch is a permutation seeded by (seed, epoch) alone, cut into global batches; each process takes
an equal contiguous share of every global batch. So one process with batch 2B and two processes with batch B see
the same global batches, and a resumed run finds the rest of an epoch by index, with nothing to replay.
"""
from __future__ import annotations


import numpy as np

from ivtlr.config import Config
from ivtlr.data import ExampleSequence, load_examples
from ivtlr.data.builtin import resolve_source
from ivtlr.errors import DataFileError

def training_examples(config: Config, limit: int | None = None) -> ExampleSequence:
    """The training split; invalid rows are skipped and counted by ``load_examples``. ``limit`` caps the count
    further (debug runs)."""
    dataset = config.dataset
    source, data_files = resolve_source(dataset)
    caps = [n for n in (dataset.limit, limit) if n is not None]
    examples = load_examples(source, dataset.train_split, data_files=data_files, keep_no_image=dataset.keep_no_image,
                             use_context=dataset.use_context, limit=min(caps) if caps else None)
    if not len(examples):
        raise DataFileError(f"no usable training examples in {dataset.source} split {dataset.train_split!r} "
                         f"(data_files={data_files}); see the warnings above for skipped rows")
    return examples


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: depends on the seed and the epoch only."""
    return np.random.default_rng((seed, epoch)).permutation(n_examples).tolist()


def process_batches(order: list[int], global_batch: int, num_processes: int, process_index: int) -> list[list[int]]:
    """This process's micro-batches: its contiguous share of each consecutive ``global_batch`` examples of ``order``.

    The order is first extended with its own beginning to a multiple of ``num_processes`` (as Accelerate's
    ``even_batches`` does), so every process gets the same number of micro-batches, none of them empty.
    """
    if global_batch % num_processes:
        raise ValueError(f"global batch {global_batch} is not a multiple of {num_processes} processes")
    short = -len(order) % num_processes
    order = order + (order * num_processes)[:short]
    batches = []
    for start in range(0, len(order), global_batch):
        chunk = order[start:start + global_batch]
        share = len(chunk) // num_processes
        batches.append(chunk[process_index * share:(process_index + 1) * share])
    return batches
