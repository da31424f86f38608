"""Tiny training runs for the training tests: a config file per run, the CLI in-process or as a subprocess, and
readers for what a run leaves behind (metrics.jsonl, checkpoint weights)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ivtlr.checkpoint import ADAPTER_FILE, FULL_WEIGHTS_FILE, latest_checkpoint
from ivtlr.cli import main
from ivtlr.training.accelerate_state import fresh_accelerate_state

REPO = Path(__file__).resolve().parents[1]

#: Smallest useful run: tiny Qwen2-VL on 56 px images (4 image tokens), K=2, one stage per epoch, full weights.
TINY_RUN = {
    "name": "run",
    "epochs_per_stage": 1,
    "max_latent_stage": 3,
    "num_epochs": 1,
    "batch_size_training": 2,
    "gradient_accumulation_steps": 1,
    "lr": 1.0e-3,
    "model": "tiny:qwen2_vl",
    "image_size": 56,
    "num_selected_patches": 2,
    "use_lora": False,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "v_proj"],
    "log_with": ["jsonl"],
}


def write_config(directory: Path, data_files: dict, schema: str = "m3cot", **keys) -> Path:
    """A YAML config for TINY_RUN (``keys`` override it) writing under ``directory``/runs."""
    config = {**TINY_RUN, "save_path": str(directory / "runs"),
              "dataset": {"source": schema, "data_files": {k: str(v) for k, v in data_files.items()}}, **keys}
    path = directory / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_exit_status(config: Path, *overrides: str, command: str = "train") -> int:
    """``ivtlr train CONFIG overrides`` (or another command's) in this process; its exit status."""
    with fresh_accelerate_state():
        return main([command, str(config), *overrides])


def train_in_process(config: Path, *overrides: str) -> Path:
    """``ivtlr train CONFIG overrides`` in this process, which must succeed; returns the run directory."""
    assert train_exit_status(config, *overrides) == 0
    loaded = yaml.safe_load(config.read_text())
    overridden = dict(o.split("=", 1) for o in overrides)
    return Path(overridden.get("save_path", loaded["save_path"])) / overridden.get("name", loaded["name"])


def subprocess_env() -> dict[str, str]:
    """One thread per process (the test machine has two cores) and the source tree importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def train_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ivtlr", "train", str(config), *overrides]


def accelerate_command(accelerate_config: str, config: Path, *overrides: str, processes: int = 2) -> list[str]:
    """``accelerate launch --config_file configs/accelerate/<accelerate_config> -m ivtlr train CONFIG ...``"""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / accelerate_config), "--num_processes", str(processes),
            "-m", "ivtlr", "train", str(config), *overrides]


def run_subprocess(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def column(run_dir: Path, key: str) -> list:
    return [record[key] for record in metrics(run_dir)]


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint (adapter or full weights)."""
    file = checkpoint / ADAPTER_FILE
    return load_file(str(file if file.is_file() else checkpoint / FULL_WEIGHTS_FILE))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint_weights(latest_checkpoint(run_dir / "checkpoints"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, then back: tiny models run several times faster so than on two busy cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def single_thread():
    with one_thread():
        yield
