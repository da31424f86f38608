"""The run configuration (`ivtlr.config`), the shipped run configs and the shipped accelerate configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from ivtlr.config import Config, ConfigError, apply_override, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ACCELERATE_CONFIGS = CONFIGS / "accelerate"
PAPER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The original repository's qwen_vl/args/qwen.yaml, verbatim (Python's `None` and the `!!float` tag included).
ORIGINAL_QWEN_YAML = """\
project: ivtlr
save_path: /path
name: m3cot_IVTLR

epochs_per_stage: 4
max_latent_stage: 5
pad_latent_to_max: True

load_model_path: None
seed: 0
resume: 0
bf16: True
batch_size_training: 2
debug: False
gradient_accumulation_steps: 8
num_epochs: 16
lr: !!float "4e-5"
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ---------------------------------------------------------------- run configs


def test_defaults_are_the_original_readme_defaults():
    config = Config()
    assert (config.epochs_per_stage, config.max_latent_stage, config.resume) == (4, 5, 0)
    assert (config.batch_size_training, config.gradient_accumulation_steps, config.num_epochs) == (4, 4, 16)
    assert config.lr == 4e-5
    assert (config.use_lora, config.lora_r, config.lora_alpha, config.lora_dropout) == (True, 64, 16, 0.05)
    assert config.lora_target_modules == PAPER_LORA_TARGETS
    assert (config.weight_decay, config.max_grad_norm, config.warmup_steps, config.reset_optimizer) == (
        0.01, 0.7, 0, False
    )


def test_original_yaml_loads_unchanged(tmp_path):
    config = load_config(write(tmp_path, ORIGINAL_QWEN_YAML))
    assert (config.project, config.save_path, config.name) == ("ivtlr", "/path", "m3cot_IVTLR")
    assert (config.epochs_per_stage, config.max_latent_stage, config.pad_latent_to_max) == (4, 5, True)
    assert config.load_model_path is None  # the original writes Python's None, which YAML reads as text
    assert (config.seed, config.resume, config.bf16, config.debug) == (0, 0, True, False)
    assert (config.batch_size_training, config.gradient_accumulation_steps, config.num_epochs) == (2, 8, 16)
    assert type(config.lr) is float and config.lr == 4e-5
    assert config.run_dir == Path("/path/m3cot_IVTLR")


def test_yaml_1_1_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads `4e-5` (no dot) as the string "4e-5"; it must still be a float learning rate.
    config = load_config(write(tmp_path, "lr: 4e-5\nweight_decay: 1e-2\n"))
    assert type(config.lr) is float and config.lr == 4e-5
    assert type(config.weight_decay) is float and config.weight_decay == 0.01


def test_ints_are_accepted_for_floats_but_not_bools_for_ints(tmp_path):
    config = load_config(write(tmp_path, "max_grad_norm: 1\n"))
    assert type(config.max_grad_norm) is float and config.max_grad_norm == 1.0
    with pytest.raises(ConfigError, match=r"'num_epochs' expects int, got True \(bool\)"):
        load_config(write(tmp_path, "num_epochs: true\n"))


@pytest.mark.parametrize(
    ("file_name", "model", "source", "k", "image_size"),
    [
        ("qwen2vl_m3cot.yaml", "Qwen/Qwen2-VL-7B-Instruct", "LightChen2333/M3CoT", 32, 280),
        ("qwen2vl_scienceqa.yaml", "Qwen/Qwen2-VL-7B-Instruct", "derek-thomas/ScienceQA", 32, 280),
        ("qwen25vl_m3cot.yaml", "Qwen/Qwen2.5-VL-7B-Instruct", "LightChen2333/M3CoT", 32, 280),
        ("chameleon_scienceqa.yaml", "facebook/chameleon-7b", "derek-thomas/ScienceQA", 64, None),
        ("chameleon_m3cot.yaml", "facebook/chameleon-7b", "LightChen2333/M3CoT", 64, None),
    ],
)
def test_paper_configs_hold_the_paper_hyperparameters(file_name, model, source, k, image_size):
    config = load_config(CONFIGS / file_name)
    assert (config.model, config.dataset.source, config.num_selected_patches, config.image_size) == (
        model, source, k, image_size
    )
    assert config.dataset.keep_no_image is False
    assert (config.use_lora, config.lora_r, config.lora_alpha, config.lora_dropout) == (True, 64, 16, 0.05)
    assert config.lora_target_modules == PAPER_LORA_TARGETS
    assert (config.lr, config.weight_decay, config.max_grad_norm) == (4e-5, 0.01, 0.7)
    assert (config.bf16, config.gradient_checkpointing) == (True, True)
    assert (config.batch_size_training, config.gradient_accumulation_steps) == (2, 8)
    assert (config.num_epochs, config.epochs_per_stage, config.max_latent_stage) == (16, 4, 3)
    assert (config.mode, config.positions, config.latent_grad) == ("ivtlr", "original", "detach")
    assert config.name == file_name.removesuffix(".yaml")


def test_tiny_cpu_config_is_a_small_fp32_run_on_builtin_data():
    config = load_config(CONFIGS / "tiny_cpu.yaml")
    assert (config.model, config.dataset.source, config.bf16) == ("tiny:qwen2_vl", "digits", False)
    assert config.epochs_per_stage == 2
    assert config.num_epochs == config.epochs_per_stage * (config.max_latent_stage + 1)  # ends on the last stage
    assert config.batch_size_training <= 8 and config.dataset.limit is not None


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_round_trips(path, tmp_path):
    config = load_config(path)
    save_config(config, tmp_path / "saved" / "config.yaml")
    assert load_config(tmp_path / "saved" / "config.yaml") == config


def test_overrides_are_typed(tmp_path):
    config = load_config(
        CONFIGS / "tiny_cpu.yaml",
        [
            "lr=1e-4",
            "bf16=true",
            "num_selected_patches=16",
            "eval.n_latent=2",
            "log_with=[jsonl, wandb]",
            "dataset.limit=null",
            "dataset.data_files={train: a.parquet, test: [b.parquet, c.parquet]}",
            "name=2024",  # text for a string key, although YAML reads it as a number
            "load_model_path=None",
        ],
    )
    assert type(config.lr) is float and config.lr == 1e-4
    assert config.bf16 is True
    assert config.num_selected_patches == 16 and config.eval.n_latent == 2
    assert config.log_with == ["jsonl", "wandb"]
    assert config.dataset.limit is None
    assert config.dataset.data_files == {"train": "a.parquet", "test": ["b.parquet", "c.parquet"]}
    assert config.name == "2024"
    assert config.load_model_path is None
    assert config.dataset.source == "digits"  # a dotted override leaves the rest of its section alone


def test_later_overrides_win():
    config = Config()
    apply_override(config, "seed=1")
    apply_override(config, "seed=7")
    assert config.seed == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs_per_stgae=2", r"unknown config key 'epochs_per_stgae'; did you mean 'epochs_per_stage'\?"),
        ("eval.batchsize=2", r"unknown config key 'eval.batchsize'; did you mean 'eval.batch_size'\?"),
        ("evals.batch_size=2", r"unknown config key 'evals'; did you mean 'eval'\?"),
        ("lr.value=2", r"'lr' is not a section"),
        ("lr=fast", r"config key 'lr' expects float, got 'fast' \(str\)"),
        ("bf16=maybe", r"config key 'bf16' expects bool, got 'maybe' \(str\)"),
        ("batch_size_training=2.5", r"config key 'batch_size_training' expects int, got 2.5 \(float\)"),
        ("positions=rope", r"config key 'positions' expects one of 'original', 'mrope', got 'rope'"),
        ("log_with=[jsonl, mlflow]", r"config key 'log_with\[1\]' expects one of 'jsonl', 'tensorboard', 'wandb'"),
        ("eval.n_latent=three", r"config key 'eval.n_latent' expects int \| null, got 'three'"),
        ("dataset=m3cot", r"config key 'dataset' is a section"),
        ("lr", r"override 'lr' is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(Config(), override)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_size_trainig: 2\n", r"unknown config key 'batch_size_trainig'; did you mean 'batch_size_training'\?"),
        ("dataset:\n  sorce: m3cot\n", r"unknown config key 'dataset.sorce'; did you mean 'dataset.source'\?"),
        ("batch_size_training: four\n", r"config key 'batch_size_training' expects int, got 'four' \(str\)"),
        ("lora_target_modules: q_proj\n", r"config key 'lora_target_modules' expects list\[str\], got 'q_proj'"),
        ("eval: 3\n", r"config key 'eval' is a section and expects a mapping, got 3"),
        ("- lr\n", r"a config must be a mapping"),
    ],
)
def test_bad_files_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(("text", "message"), [
    ("lr: [1, 2\n", r"is not valid YAML \(line 2, column 1\)"),
    ("model: !!python/object/apply:os.system ['touch {marker}']\n", r"could not determine a constructor for the tag"),
])
def test_a_file_that_is_not_plain_yaml_is_refused_without_running_anything(tmp_path, text, message):
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text.format(marker=marker)))
    assert not marker.exists()


def test_a_missing_file_or_a_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_to_dict_is_plain_nested_data():
    data = Config().to_dict()
    assert data["eval"] == {"batch_size": 8, "max_new_tokens": 512, "answer_rule": "original", "n_latent": None}
    assert data["dataset"]["source"] == "m3cot"
    assert Config.from_dict(data) == Config()


# ---------------------------------------------------------------- accelerate configs


def launch_args(config_file: Path):
    """What `accelerate launch --config_file config_file script.py` settles on before starting processes.

    `_validate_launch_command` is accelerate's private step of `accelerate launch`; it is used (not asserted on)
    because it is the one place that turns a config file into launch options, which is what our files promise."""
    args = launch_command_parser().parse_args(["--config_file", str(config_file), "script.py"])
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize(
    ("file_name", "distributed_type", "num_processes", "mixed_precision", "use_cpu"),
    [
        ("ddp.yaml", DistributedType.MULTI_GPU, 4, "bf16", False),
        ("fsdp.yaml", DistributedType.FSDP, 4, "bf16", False),
        ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED, 4, "bf16", False),
        ("cpu_ddp.yaml", DistributedType.MULTI_GPU, 2, "no", True),
    ],
)
def test_accelerate_configs_load_through_accelerate(file_name, distributed_type, num_processes, mixed_precision,
                                                    use_cpu):
    config = load_config_from_file(str(ACCELERATE_CONFIGS / file_name))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.mixed_precision, config.use_cpu) == (
        distributed_type, num_processes, mixed_precision, use_cpu
    )
    args = launch_args(ACCELERATE_CONFIGS / file_name)
    assert (args.num_processes, args.mixed_precision) == (num_processes, mixed_precision)
    # Keys inside fsdp_config / deepspeed_config are copied onto the launch options without any check, so a
    # misspelt one would be silently ignored: each must be a real `accelerate launch` option.
    known_options = set(vars(launch_command_parser().parse_args(["script.py"])))
    for section in (config.fsdp_config, config.deepspeed_config):
        assert set(section) <= known_options


def test_fsdp_config_gives_a_full_shard_transformer_wrap_plugin():
    env = prepare_multi_gpu_env(launch_args(ACCELERATE_CONFIGS / "fsdp.yaml"))
    assert env["ACCELERATE_USE_FSDP"] == "true"
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward) == (2, True)
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    # None: the trainer then names the classes itself (fsdp_wrap_classes, test_train_distributed).
    assert plugin.transformer_cls_names_to_wrap is None


def test_deepspeed_config_matches_the_original_ds_config():
    args = launch_args(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml")
    args.deepspeed_fields_from_accelerate_config = ""  # set by `accelerate launch` itself before this call
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_GRADIENT_CLIPPING"] == "0.7"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # Left to the run config: this variable would override the Accelerator's gradient_accumulation_steps.
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env


PROBE_SCRIPT = """\
import json, sys
import torch
from accelerate import Accelerator

accelerator = Accelerator(cpu=True)
total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), reduction="sum")
if accelerator.is_main_process:
    with open(sys.argv[1], "w") as handle:
        json.dump({"num_processes": accelerator.num_processes, "type": str(accelerator.distributed_type),
                   "total": total.item()}, handle)
accelerator.end_training()  # without it gloo sometimes aborts at interpreter exit
"""


def test_cpu_ddp_config_starts_two_communicating_processes(tmp_path):
    script = write(tmp_path, PROBE_SCRIPT, name="probe.py")
    result_file = tmp_path / "result.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ACCELERATE_CONFIGS / "cpu_ddp.yaml"), str(script), str(result_file)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(result_file.read_text()) == {"num_processes": 2, "type": "DistributedType.MULTI_CPU",
                                                   "total": 3.0}


@pytest.mark.parametrize(("override", "named"), [
    ("batch_size_training=0", "batch_size_training must be >= 1"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps must be >= 1"),
    ("epochs_per_stage=0", "epochs_per_stage must be >= 1"),
    ("lr=-1e-4", "lr must be >= 0"),
    ("eval.n_latent=-1", "eval.n_latent must be >= 0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1"),
    ("max_latent_stage=0", "trains no latent step"),
    ("image_size=0", "image_size must be >= 1"),
    ("lora_r=0", "lora_r must be >= 1"),
    ("lora_dropout=2", "lora_dropout is a probability"),
    ("lr=.inf", "lr must be a finite number, got inf"),
    ("lr=nan", "lr must be a finite number, got nan"),
    ("max_grad_norm=.inf", "max_grad_norm must be a finite number"),
    ("weight_decay=-.inf", "weight_decay must be a finite number"),
    ("lora_dropout=.nan", "lora_dropout must be a finite number"),
    ("step_supervision=.inf", "step_supervision must be a finite number"),
    ("name=", "name must name the run's own folder under save_path, got ''"),
    ("name=.", "name must name the run's own folder"),
])
def test_values_a_run_cannot_use_are_refused_before_anything_loads(override, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        load_config(CONFIGS / "tiny_cpu.yaml", [override])


def test_a_latent_free_mode_may_have_no_latent_stage_and_defaults_pass():
    assert load_config(CONFIGS / "tiny_cpu.yaml", ["mode=cot", "max_latent_stage=0"]).max_latent_stage == 0
    assert Config().check_values() == Config()


def test_cli_reports_a_user_error_in_one_line_with_exit_2(capsys, monkeypatch):
    from ivtlr.cli import main

    monkeypatch.delenv("IVTLR_DEBUG", raising=False)
    assert main(["train", str(CONFIGS / "tiny_cpu.yaml"), "batch_size_training=0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == "ivtlr train: error: batch_size_training must be >= 1, got 0"
    assert not any("Traceback" in line for line in error)
    monkeypatch.setenv("IVTLR_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", str(CONFIGS / "tiny_cpu.yaml"), "batch_size_training=0"])
