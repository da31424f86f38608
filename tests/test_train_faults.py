"""Training killed at checkpoint sub-steps (writing each part, flushing, renaming, pruning) and run again with the
same command ends with the weights of the uninterrupted run, bit for bit.

The kills come from the ``IVTLR_FAULT_AT=n`` hook (``ivtlr.checkpoint.fault_point``: ``os._exit`` at the n-th
sub-step, no cleanup). To keep it fast, one worker process (this file run as a script) imports everything once and
forks a child per training run: the uninterrupted reference, then per kill point the killed run and its re-run.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from schema_files import write_m3cot_files
from train_runs import column, final_weights, subprocess_env, write_config

from ivtlr.checkpoint import (FAULT_ENV, FAULT_EXIT_CODE, checkpoint_dirs, fault_points_passed, read_meta,
                              verify_checkpoint)

# 2 questions at batch 1: 2 steps per epoch, 4 in all, a checkpoint after each, the last 2 kept (2 prunings).
# LoRA dropout: a re-run must also restore the RNG that draws the masks.
RUN = dict(name="reference", num_epochs=2, max_latent_stage=1, batch_size_training=1, use_lora=True,
           lora_dropout=0.1, lr=1e-2, save_every_steps=1, keep_last=2)
KILL_POINTS = 24
SEED = 0
NEVER = 10**9  # counts the sub-steps without ending the run


def test_every_kill_point_resumes_to_the_uninterrupted_weights(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)
    config = write_config(tmp_path, files, **RUN)
    report_file = tmp_path / "report.json"
    result = subprocess.run([sys.executable, __file__, str(config), str(report_file), str(KILL_POINTS), str(SEED)],
                            env={**subprocess_env(), "TOKENIZERS_PARALLELISM": "false"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(report_file.read_text())
    labels, kills = report["labels"], report["kills"]
    assert len(kills) == KILL_POINTS <= len(labels)
    assert {label for label in labels if "deleted" in label} <= {kill["label"] for kill in kills}  # every pruning

    runs = tmp_path / "runs"
    reference = final_weights(runs / "reference")
    steps = [read_meta(c).step for c in checkpoint_dirs(runs / "reference" / "checkpoints")]
    assert steps == [3, 4]
    for kill in kills:
        run_dir = runs / kill["name"]
        assert kill["killed"] == FAULT_EXIT_CODE and kill["rerun"] == 0, kill
        weights = final_weights(run_dir)
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[key], reference[key]) for key in reference), kill
        checkpoints = checkpoint_dirs(run_dir / "checkpoints")
        assert [read_meta(c).step for c in checkpoints] == steps, kill
        assert all(verify_checkpoint(c, training_state=True) for c in checkpoints)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [c.name for c in checkpoints], kill
        assert column(run_dir, "step") == [1, 2, 3, 4], kill


# ------------------------------------------------------------------------------------------------ the worker
def _in_child(run: Callable[[], None], fault_at: int | None) -> int:
    """Run ``run`` in a forked child with the fault hook set to ``fault_at``; its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if fault_at is not None:
                os.environ[FAULT_ENV] = str(fault_at)
            run()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _train(config: Path, *overrides: str, labels_file: Path | None = None) -> Callable[[], None]:
    def run() -> None:
        from ivtlr.cli import main

        assert main(["train", str(config), *overrides]) == 0
        if labels_file is not None:
            labels_file.write_text(json.dumps(fault_points_passed()))
    return run


def _choose(labels: list[str], count: int, seed: int) -> list[int]:
    """Every pruning sub-step, then seeded random others: ``count`` kill points (1-based) in all."""
    pruning = [n for n, label in enumerate(labels, 1) if "deleted" in label or "hidden" in label]
    others = [n for n in range(1, len(labels) + 1) if n not in pruning]
    return sorted(pruning + random.Random(seed).sample(others, count - len(pruning)))


def _warm_up(config: Path) -> None:
    """One run in this process (hook off), so each forked child starts with everything imported and cached."""
    from ivtlr.cli import main
    from ivtlr.training.accelerate_state import fresh_accelerate_state

    with fresh_accelerate_state():
        assert main(["train", str(config), "name=warm-up"]) == 0


def _worker(config: Path, report_file: Path, count: int, seed: int) -> None:
    torch.set_num_threads(1)
    _warm_up(config)
    labels_file = report_file.with_name("labels.json")
    assert _in_child(_train(config, labels_file=labels_file), NEVER) == 0
    labels = json.loads(labels_file.read_text())
    kills = []
    for point in _choose(labels, count, seed):
        name = f"kill-{point:03d}"
        killed = _in_child(_train(config, f"name={name}"), point)
        rerun = _in_child(_train(config, f"name={name}"), None)
        kills.append({"name": name, "point": point, "label": labels[point - 1], "killed": killed, "rerun": rerun})
    report_file.write_text(json.dumps({"labels": labels, "kills": kills}, indent=1))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
