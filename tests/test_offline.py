"""Offline, a hub id that is not cached fails fast with one line naming it (no traceback from deep inside the hub
client): the example configs name real hub ids, and a new user's first run may have no network."""
from __future__ import annotations

import subprocess
import sys

from schema_files import write_m3cot_files
from train_runs import REPO, subprocess_env, write_config


def run_offline(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home")}
    return subprocess.run([sys.executable, "-m", "ivtlr", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "ivtlr train: error:" in line]
    assert all(name in line for name in named), line


def test_an_example_config_offline_names_the_dataset_it_cannot_reach(tmp_path):
    result = run_offline("train", str(REPO / "configs" / "qwen2vl_m3cot.yaml"), f"save_path={tmp_path}", cwd=tmp_path)
    assert_one_line_error(result, "'LightChen2333/M3CoT'", "dataset.data_files")


def test_a_hub_model_offline_is_named_after_the_data_checks(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)
    config = write_config(tmp_path, files, model="Qwen/Qwen2-VL-2B-Instruct")
    result = run_offline("train", str(config), cwd=tmp_path)
    assert_one_line_error(result, "'Qwen/Qwen2-VL-2B-Instruct'", "set model: to a local directory")
