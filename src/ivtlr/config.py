"""Typed run configuration: YAML files plus ``key=value`` overrides, checked against the dataclass field types.

The original IVT-LR YAML keys (``save_path``, ``epochs_per_stage``, ``batch_size_training``, ``lr``, ...) are
accepted at the top level exactly as the original files write them, so an original config loads unchanged.
Validation is driven by the field annotations alone: an unknown key or a value of the wrong type fails at load
time with the key named, instead of surfacing hours later as an attribute error inside a training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ivtlr.errors import UserError
from ivtlr.modes import LATENT_MODES, Mode

PositionMode = Literal["original", "mrope"]
LatentGrad = Literal["detach", "full"]
PatchOrder = Literal["position", "score", "topk"]
Logger = Literal["jsonl", "tensorboard", "wandb"]
AnswerRule = Literal["original", "m3cot", "ivtlr_loose"]
OnNonFinite = Literal["stop", "skip"]
DataFiles = Union[str, list[str], dict[str, Union[str, list[str]]]]

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema; the message names the offending key."""


@dataclass
class DatasetConfig:
    """Where the examples come from (see ``ivtlr.data.sources.load_examples``)."""

    source: str = "m3cot"  # hub id, "m3cot", "scienceqa", "auto" (local files) or "digits" (built-in demo data)
    data_files: DataFiles | None = None  # local parquet/JSONL: one path, a list, or {split: path(s)}
    train_split: str = "train"
    eval_split: str = "test"
    keep_no_image: bool = False  # the paper trains and scores the image subset only
    use_context: bool = False  # prepend M3CoT `context` / ScienceQA `hint` to the question
    limit: int | None = None  # keep at most this many examples per split (smoke runs)


@dataclass
class EvalConfig:
    """Generation and scoring settings for ``ivtlr eval``."""

    batch_size: int = 8
    max_new_tokens: int = 512  # the original's budget; generation stops at EOS long before
    answer_rule: AnswerRule = "original"  # how the option letter is read from the generated text
    n_latent: int | None = None  # latent steps at inference; null = max_latent_stage


@dataclass
class RLConfig:
    """Reinforcement learning on latent chains (``ivtlr rl``): GRPO from a trained checkpoint (``load_model_path``),
    with the latent rows, the patches and the answer tokens as draws of one stochastic policy
    (``ivtlr.method.policy``). ``lr``, ``weight_decay``, ``max_grad_norm``, ``warmup_steps``, ``seed``,
    ``save_every_steps`` and ``keep_last`` are the top-level keys."""

    steps: int = 100  # rollout batches; each gives ``updates_per_rollout`` optimizer steps
    questions_per_step: int = 8  # questions per rollout batch, per process
    group_size: int = 8  # G rollouts per question: its advantages are normalised within the group
    questions_per_pass: int | None = None  # questions per rollout/replay forward (x G samples); null = all at once
    updates_per_rollout: int = 1  # optimizer steps on each rollout batch (the ratios leave 1 from the second on)
    sigma: float = 0.03  # latent text: noise std relative to the state's RMS; 0 = the deterministic state
    tau: float = 0.01  # latent vision: temperature of softmax(attention scores / tau); 0 = top-K
    temperature: float = 1.0  # answer tokens are sampled at this temperature
    max_new_tokens: int = 64
    clip_text: float = 0.2  # clip ranges of the ratio, one per kind of choice
    clip_latent: float = 0.2
    clip_patch: float = 0.2
    dual_clip: float | None = 3.0  # a negative advantage's objective is bounded by dual_clip * A; null = off
    weight_text: float = 1.0  # weights of each kind's policy loss
    weight_latent: float = 0.01  # a Gaussian row's score (noise / scale, over the hidden size) dwarfs a token's
    weight_patch: float = 1.0
    kl: float = 0.0  # weight of the KL penalty to the starting model (k3 estimate over every choice); 0 = none
    reward_correct: float = 1.0  # reward of a right answer
    reward_format: float = 0.0  # added when the answer names an option at all, right or wrong
    answer_rule: AnswerRule = "original"  # how the option letter is read from a rollout's text
    scale_advantages: bool = True  # divide by the group's reward std (GRPO); false: only subtract its mean
    n_latent: int | None = None  # latent steps per question; null = the starting checkpoint's


@dataclass
class Config:
    """Everything a training or evaluation run needs, with the original README's defaults."""

    # Keys of the original IVT-LR YAML files.
    project: str = "ivtlr"  # experiment-tracker project name
    save_path: str = "checkpoints"
    name: str = "ivtlr"  # run name; checkpoints go to save_path/name
    epochs_per_stage: int = 4
    max_latent_stage: int = 5
    pad_latent_to_max: bool = True  # beyond max_latent_stage, always use max_latent_stage latents
    load_model_path: str | None = None  # checkpoint to start from
    seed: int = 0
    resume: int = 0  # epoch to resume from (the curriculum stage follows from it)
    bf16: bool = False
    batch_size_training: int = 4  # per device
    debug: bool = False
    gradient_accumulation_steps: int = 4
    num_epochs: int = 16
    lr: float = 4e-5

    # Model and data.
    model: str = "Qwen/Qwen2-VL-7B-Instruct"  # hub id, local dir, or tiny:qwen2_vl / tiny:qwen2_5_vl / tiny:chameleon
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    image_size: int | None = None  # square side in pixels; null = the family's default
    max_length: int | None = None  # truncate training sequences to this many tokens

    # The method.
    mode: Mode = "ivtlr"
    num_selected_patches: int | None = None  # K; null = the family default (Qwen 32, Chameleon 64)
    latents_per_step: int = 1
    positions: PositionMode = "original"
    latent_grad: LatentGrad = "detach"
    patch_order: PatchOrder = "position"
    # Supervision of the latent steps (ivtlr.method.supervision); 0 = off, the paper's objective.
    step_supervision: float = 0.0  # weight of the step loss: each latent state decodes the written step it replaced
    region_supervision: float = 0.0  # weight of the region loss: attention on the region a step reads (step_boxes)
    vision_bottleneck: bool = False  # rows after the prompt see the image only through the patches latent steps insert

    # Optimisation.
    weight_decay: float = 0.01
    max_grad_norm: float = 0.7
    warmup_steps: int = 0
    reset_optimizer: bool = False  # fresh optimizer state at every curriculum stage
    on_nonfinite: OnNonFinite = "stop"  # a step with an inf/NaN loss or gradient norm: stop the run, or skip it
    gradient_checkpointing: bool = False

    # LoRA on the language model.
    use_lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))

    # Running and bookkeeping.
    save_every_steps: int | None = None  # null = save at the end of every epoch
    keep_last: int | None = None  # keep only the newest N checkpoints; null = keep all
    num_workers: int = 0
    log_with: list[Logger] = field(default_factory=lambda: ["jsonl", "tensorboard"])

    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    @property
    def run_dir(self) -> Path:
        """Where this run writes checkpoints and logs (``save_path/name``, as in the original)."""
        return Path(self.save_path) / self.name

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build a config from plain data (a parsed YAML file), defaults filling what is missing."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
        config = cls()
        _merge(config, data, prefix="")
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-safe) that ``from_dict`` turns back into an equal config."""
        return dataclasses.asdict(self)

    def check_values(self) -> Config:
        """Values the types allow but a run cannot use, refused before anything loads (a zero batch size would fail
        deep inside a data loader; a negative latent count would silently run with none). Returns the config."""
        problems = [f"{key} must be a finite number, got {value!r}" for key, value in _float_values(self)
                    if not math.isfinite(value)]
        problems += [f"{key} must be {rule}, got {value!r}" for key, value, rule in _range_checks(self)
                     if value is not None and math.isfinite(value) and not _within(value, rule)]
        if math.isfinite(self.lora_dropout) and not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout is a probability: it must be >= 0 and < 1, got {self.lora_dropout!r}")
        if self.name.strip() in ("", ".", ".."):
            problems.append(f"name must name the run's own folder under save_path, got {self.name!r}: an empty name "
                            "would write checkpoints and logs straight into save_path, among other runs")
        if self.mode in LATENT_MODES and self.max_latent_stage < 1:
            problems.append(f"mode {self.mode!r} with max_latent_stage={self.max_latent_stage} trains no latent "
                            "step: set max_latent_stage >= 1 (or mode: cot)")
        problems += _supervision_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def _supervision_problems(config: Config) -> list[str]:
    """A supervision weight needs latent steps of the kind it trains (finiteness is checked with every float)."""
    problems = []
    for key in ("step_supervision", "region_supervision"):
        weight = getattr(config, key)
        if weight and math.isfinite(weight) and config.mode not in LATENT_MODES:
            problems.append(f"{key} trains latent steps, which mode {config.mode!r} has none of: set it to 0")
    if config.step_supervision and config.mode == "latent_vision_only":
        problems.append("step_supervision decodes the state a latent step feeds back, which mode "
                        "'latent_vision_only' does not feed back: set it to 0")
    if config.region_supervision and (config.mode == "latent_text_only" or config.num_selected_patches == 0):
        problems.append("region_supervision trains the attention that chooses the inserted patches, and this run "
                        "inserts none (latent_text_only or num_selected_patches=0): set it to 0")
    if config.vision_bottleneck and (config.mode not in LATENT_MODES or config.mode == "latent_text_only"
                                     or config.num_selected_patches == 0):
        problems.append("vision_bottleneck leaves later rows only the patches latent steps insert, and this run "
                        f"inserts none (mode {config.mode!r}, num_selected_patches={config.num_selected_patches}): "
                        "set it to false")
    return problems


def _float_values(section: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(key, value) of every float setting, sections included: infinity or NaN would pass the range checks (``lr=.inf``
    trains, ``nan`` compares false to every bound) and silently ruin a run."""
    values = []
    for name, annotation in _field_types(type(section)).items():
        value = getattr(section, name)
        if dataclasses.is_dataclass(annotation):
            values += _float_values(value, prefix=f"{prefix}{name}.")
        elif isinstance(value, float):
            values.append((prefix + name, value))
    return values


def _range_checks(config: Config) -> list[tuple[str, Any, str]]:
    """(key, value, rule) for every numeric setting with a lower bound; None values (defaults) are not checked."""
    return [("batch_size_training", config.batch_size_training, ">= 1"),
            ("gradient_accumulation_steps", config.gradient_accumulation_steps, ">= 1"),
            ("num_epochs", config.num_epochs, ">= 1"), ("epochs_per_stage", config.epochs_per_stage, ">= 1"),
            ("max_latent_stage", config.max_latent_stage, ">= 0"), ("resume", config.resume, ">= 0"),
            ("latents_per_step", config.latents_per_step, ">= 1"), ("lr", config.lr, ">= 0"),
            ("image_size", config.image_size, ">= 1"), ("lora_r", config.lora_r, ">= 1"),
            ("lora_alpha", config.lora_alpha, "> 0"),
            ("weight_decay", config.weight_decay, ">= 0"), ("max_grad_norm", config.max_grad_norm, "> 0"),
            ("warmup_steps", config.warmup_steps, ">= 0"),
            ("step_supervision", config.step_supervision, ">= 0"),
            ("region_supervision", config.region_supervision, ">= 0"),
            ("num_selected_patches", config.num_selected_patches, ">= 0"),
            ("max_length", config.max_length, ">= 1"), ("save_every_steps", config.save_every_steps, ">= 1"),
            ("keep_last", config.keep_last, ">= 1"), ("num_workers", config.num_workers, ">= 0"),
            ("dataset.limit", config.dataset.limit, ">= 1"), ("eval.batch_size", config.eval.batch_size, ">= 1"),
            ("eval.max_new_tokens", config.eval.max_new_tokens, ">= 1"),
            ("eval.n_latent", config.eval.n_latent, ">= 0"),
            *((f"rl.{key}", getattr(config.rl, key), ">= 1") for key in (
                "steps", "questions_per_step", "questions_per_pass", "updates_per_rollout", "max_new_tokens")),
            ("rl.group_size", config.rl.group_size, ">= 2"), ("rl.n_latent", config.rl.n_latent, ">= 0"),
            ("rl.temperature", config.rl.temperature, "> 0"), ("rl.dual_clip", config.rl.dual_clip, "> 1"),
            *((f"rl.{key}", getattr(config.rl, key), ">= 0") for key in (
                "sigma", "tau", "clip_text", "clip_latent", "clip_patch", "weight_text", "weight_latent",
                "weight_patch", "kl"))]


def _within(value: float, rule: str) -> bool:
    bound = float(rule.split()[1])
    return value > bound if rule.startswith("> ") else value >= bound


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config and apply ``key=value`` overrides (dotted keys reach into sections).

    Only plain YAML is read: a ``!!python/...`` tag is refused, never run.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError as error:
        raise ConfigError(f"config file {path} does not exist") from error
    except IsADirectoryError as error:
        raise ConfigError(f"config {path} is a folder: give a YAML file (e.g. configs/tiny_cpu.yaml)") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"config {path} is not a UTF-8 text file: give a YAML file") from error
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config {path} is not valid YAML{line}: {problem}; plain YAML only "
                          "(no !!python tags)") from error
    config = Config.from_dict(data if data is not None else {})
    for override in overrides:
        apply_override(config, override)
    return config.check_values()


def save_config(config: Config, path: str | os.PathLike[str]) -> None:
    """Write ``config`` as YAML that ``load_config`` reads back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=False)


def apply_override(config: Config, override: str) -> None:
    """Set one ``key=value`` on ``config``; the value is read as YAML (``true``, ``3``, ``[a, b]``, ``null``).

    A value meant as text never needs quoting: when the YAML reading does not fit a field that takes strings
    (``name=2024``, ``save_path=a: b``), the raw text is used.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    *sections, leaf = key.split(".")
    section_type: type = Config
    prefix = ""
    for name in sections:
        section_type = _field_type(section_type, name, prefix)
        if not dataclasses.is_dataclass(section_type):
            raise ConfigError(f"config key '{prefix}{name}' is not a section, so '{key}' does not exist")
        prefix += name + "."
    value = _override_value(raw, _field_type(section_type, leaf, prefix))
    nested: Any = value
    for name in reversed([*sections, leaf]):
        nested = {name: nested}
    _merge(config, nested, prefix="")


def _override_value(raw: str, annotation: Any) -> Any:
    """The YAML reading of ``raw``, or ``raw`` itself when only the text fits a string-typed field."""
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        parsed = raw
    if dataclasses.is_dataclass(annotation) or _fits(parsed, annotation) or not _fits(raw, annotation):
        return parsed
    return raw


def _merge(section: Any, values: Mapping[str, Any], prefix: str) -> None:
    """Check and assign ``values`` onto the dataclass instance ``section``; nested mappings merge into sections."""
    for name, value in values.items():
        name = str(name)
        key = prefix + name
        annotation = _field_type(type(section), name, prefix)
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{key}' is a section and expects a mapping, got {value!r}")
            _merge(getattr(section, name), value, prefix=key + ".")
        else:
            setattr(section, name, _coerce(value, annotation, key))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (annotations are strings here: postponed evaluation)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _field_type(cls: type, name: str, prefix: str) -> Any:
    """The annotation of field ``name`` of ``cls``; an unknown name is an error suggesting the closest valid one."""
    types_by_name = _field_types(cls)
    if name in types_by_name:
        return types_by_name[name]
    close = difflib.get_close_matches(name, list(types_by_name), n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(types_by_name)}"
    raise ConfigError(f"unknown config key '{prefix}{name}'; {hint}")


def _fits(value: Any, annotation: Any) -> bool:
    try:
        _coerce(value, annotation, "")
    except ConfigError:
        return False
    return True


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation`` (and converted where YAML is lossy), or a ConfigError naming ``key``.

    Ints are accepted for floats; strings such as ``"4e-5"`` (YAML 1.1 reads exponents without a dot as text)
    are accepted for floats; the string ``"None"`` (the original configs write Python's None) means null.
    """
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and (value is None or value == "None"):
            return None
        for option in (option for option in options if option is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in typing.get_args(annotation)):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(annotation)
            return [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            key_type, item_type = typing.get_args(annotation)
            return {
                _coerce(name, key_type, key): _coerce(item, item_type, f"{key}.{name}") for name, item in value.items()
            }
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation in (bool, str):
        if isinstance(value, annotation):
            return value
    else:
        raise TypeError(f"config field '{key}' has an annotation the loader does not handle: {annotation!r}")
    raise ConfigError(f"config key '{key}' expects {_describe(annotation)}, got {value!r} ({type(value).__name__})")


def _describe(annotation: Any) -> str:
    """A reader-facing name for a type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(option) for option in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_describe(arg) for arg in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", repr(annotation))
