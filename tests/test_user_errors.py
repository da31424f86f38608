"""Every mistake a user can fix is one line on stderr and exit status 2 — and, where the config or the options alone
reveal it, within a second or two, before torch or any model loads (each command checks them first).

Each case runs the real command line in a subprocess. Mistakes that show only once the data or the model is read
(an image size the family cannot tile, no usable rows, a refused pickle) end the same way,
with the log lines before the error and no model built."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from schema_files import digit_image, m3cot_rows, write_m3cot_files, write_rows

REPO = Path(__file__).resolve().parents[1]
#: Seconds a command may take to refuse a mistake the config or the options reveal (Python, PyYAML and PIL load in
#: about 0.1 s; torch alone takes about 2 s here, transformers 4 s more).
EARLY_SECONDS = 3.0
#: Logged once the model is built: its absence shows the mistake was caught before.
MODEL_BUILT = "trainable parameters"


class Evil:
    """Unpickling this runs a shell command; ``torch.load(weights_only=True)`` must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A data folder, a valid tiny config, a picture, a file where a folder is expected, bad configs and checkpoints."""
    root = tmp_path_factory.mktemp("user_errors")
    files = write_m3cot_files(root / "data", n_train=2, n_test=2, fmt="jsonl")
    config = {"name": "run", "save_path": str(root / "runs"), "epochs_per_stage": 1, "max_latent_stage": 2,
              "num_epochs": 1, "batch_size_training": 2, "gradient_accumulation_steps": 1, "model": "tiny:qwen2_vl",
              "image_size": 56, "num_selected_patches": 2, "use_lora": False, "log_with": ["jsonl"],
              "dataset": {"source": "m3cot", "data_files": {k: str(v) for k, v in files.items()}}}
    (root / "ok.yaml").write_text(yaml.safe_dump(config))
    bad_rows = m3cot_rows("train", 2)
    for row in bad_rows:
        row["choices"] = []
    bad_files = {"train": str(write_rows(root / "bad", "train", bad_rows, "m3cot", fmt="jsonl"))}
    (root / "no_rows.yaml").write_text(yaml.safe_dump({**config, "dataset": {"source": "m3cot",
                                                                             "data_files": bad_files}}))
    (root / "broken.yaml").write_text("lr: [1, 2\n")
    (root / "python_tag.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {root / 'ran'}']\n")
    (root / "a_file").write_text("not a folder")
    digit_image(3).save(root / "digit.png")
    torch.save({"w": torch.zeros(2), "code": Evil(root / "ran")}, root / "evil.pth")
    from ivtlr.testing import build_tiny

    base = build_tiny("qwen2_vl", image_size=56)
    base.model.save_pretrained(root / "base")
    base.processor.save_pretrained(root / "base")
    return root


def infer(*options: str) -> list[str]:
    return ["infer", "--question", "Which digit?", "--choices", "one", "three", *options]


#: (case id, ivtlr arguments with {root} for the fixture folder, text the error line holds, when it is refused):
#: "options": the config or the options reveal it, refused before torch loads; "before_model": the data, a model's
#: config or files reveal it, refused before a model is built;
#: "after_model": only the built model's tokenizer reveals it (sample lengths)
CASES = [
    ("save_path_is_a_file", ["train", "{root}/ok.yaml", "save_path={root}/a_file"], "a_file is a file", "options"),
    ("config_missing", ["train", "{root}/missing.yaml"], "does not exist", "options"),
    ("config_is_a_folder", ["train", "{root}/data"], "is a folder", "options"),
    ("config_not_yaml", ["train", "{root}/broken.yaml"], "is not valid YAML (line 2", "options"),
    ("config_python_tag", ["train", "{root}/python_tag.yaml"], "python/object/apply:os.system", "options"),
    ("image_size_0", ["train", "{root}/ok.yaml", "image_size=0"], "image_size must be >= 1", "options"),
    ("lora_r_0", ["train", "{root}/ok.yaml", "lora_r=0"], "lora_r must be >= 1", "options"),
    ("lora_dropout_2", ["train", "{root}/ok.yaml", "lora_dropout=2"], "lora_dropout is a probability", "options"),
    ("lr_inf", ["train", "{root}/ok.yaml", "lr=.inf"], "lr must be a finite number, got inf", "options"),
    ("lr_nan", ["train", "{root}/ok.yaml", "lr=nan"], "lr must be a finite number, got nan", "options"),
    ("max_grad_norm_inf", ["train", "{root}/ok.yaml", "max_grad_norm=.inf"], "max_grad_norm must be a finite",
     "options"),
    ("empty_name", ["train", "{root}/ok.yaml", "name="], "name must name the run's own folder", "options"),
    ("eval_out_is_a_file", ["eval", "{root}/ok.yaml", "--out", "{root}/a_file/eval"], "a_file is a file", "options"),
    ("probe_out_is_a_file", ["probe", "{root}/ok.yaml", "--out", "{root}/a_file"], "a_file is a file", "options"),
    ("eval_checkpoint_missing", ["eval", "{root}/ok.yaml", "--checkpoint", "{root}/nothing"], "is not a folder",
     "options"),
    ("infer_image_missing", infer("--checkpoint", "{root}", "--image", "{root}/missing.png"), "does not exist",
     "options"),
    ("infer_image_is_a_folder", infer("--checkpoint", "{root}", "--image", "{root}/data"), "is a folder", "options"),
    ("infer_image_not_a_picture", infer("--checkpoint", "{root}", "--image", "{root}/ok.yaml"),
     "is not a picture", "options"),
    ("infer_27_choices", ["infer", "--checkpoint", "{root}", "--image", "{root}/digit.png", "--question", "q",
                          "--choices", *"abcdefghijklmnopqrstuvwxyz", "aa"], "at most 26", "options"),
    ("original_without_base", infer("--original", "{root}/evil.pth", "--image", "{root}/digit.png"),
     "--original needs --base", "options"),
    ("unknown_tiny_family", ["train", "{root}/ok.yaml", "model=tiny:nope"], "unknown tiny model family 'nope'",
     "options"),
    ("image_size_the_family_cannot_tile", ["train", "{root}/ok.yaml", "model=tiny:qwen3_vl"],
     "Qwen3-VL image_size must be a multiple of 32, got 56", "before_model"),
    ("no_usable_training_rows", ["train", "{root}/no_rows.yaml"], "no usable training examples", "before_model"),
    ("every_sample_too_long", ["train", "{root}/ok.yaml", "max_length=20"], "longer than max_length=20", "after_model"),
    ("original_base_unreachable", infer("--original", "{root}/evil.pth", "--base", "no-such-org/no-such-model",
                                        "--image", "{root}/digit.png"), "cannot load the base model no-such-org",
     "before_model"),
    ("original_refused_pickle", infer("--original", "{root}/evil.pth", "--base", "{root}/base", "--image",
                                      "{root}/digit.png"), "unsupported GLOBAL posix.system", "before_model"),
    ("demo_no_workers", ["demo", "--workers", "0", "--out", "{root}/demo"], "--workers must be at least 1",
     "options"),
]


@pytest.mark.parametrize(("arguments", "message", "revealed_by"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_a_user_error_is_one_line_and_exit_2(place, arguments, message, revealed_by):
    import subprocess

    command = [sys.executable, "-m", "ivtlr", *(a.format(root=place) for a in arguments)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("IVTLR_DEBUG", None)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=place)
    seconds = time.perf_counter() - start
    print(f"{arguments[0]} {seconds:.2f} s")  # noqa: T201 - the per-case times, shown with -s
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith(f"ivtlr {arguments[0]}: error: ") and message in lines[-1], lines[-1]
    assert sum("error" in line.lower() for line in lines) == 1, lines
    assert not (place / "ran").exists()  # no pickle or YAML tag ran code
    if revealed_by != "after_model":
        assert MODEL_BUILT not in done.stderr
    if revealed_by == "options":
        assert len(lines) == 1, lines
        assert seconds < EARLY_SECONDS
