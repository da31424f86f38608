"""Per-step training metrics: JSON lines in the run directory, and TensorBoard / wandb through Accelerate's trackers.

``metrics.jsonl`` is the record tests and scripts read (one object per optimizer step: step, epoch, stage, loss,
lr, grad_norm, samples_per_s, ...). A resumed run first drops the lines of steps after its checkpoint, so the file
never holds a step twice.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

JSONL_FILE = "metrics.jsonl"
#: log_with entries served by Accelerate's trackers, and the package each one needs.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_names(log_with: Sequence[str]) -> list[str]:
    """The Accelerate trackers named in ``log_with``, checked to be importable (wandb is an optional extra)."""
    names = [name for name in log_with if name in TRACKER_PACKAGES]
    for name in names:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ImportError(f"log_with includes {name!r} but the {TRACKER_PACKAGES[name]} package is not "
                              f"installed: pip install 'ivtlr[{name}]', or remove {name} from log_with")
    return names


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``section.key`` scalars, the shape TensorBoard's hyper-parameter table accepts."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix + key] = value
        else:
            flat[prefix + key] = json.dumps(value)
    return flat


def _keep_steps_up_to(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Writes metrics on the main process only; the other processes' calls are no-ops."""

    def __init__(self, accelerator, run_dir: Path, *, jsonl: bool, project: str, run_name: str,
                 config: Mapping[str, Any], start_step: int = 0):
        self.accelerator = accelerator
        self.path = run_dir / JSONL_FILE if jsonl and accelerator.is_main_process else None
        if self.path is not None:
            _keep_steps_up_to(self.path, start_step)
        accelerator.init_trackers(project, config=flatten_config(config),
                                  init_kwargs={"wandb": {"name": run_name, "dir": str(run_dir)}})

    def log(self, record: Mapping[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        scalars = {key: value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.accelerator.log(scalars, step=record["step"])
