"""Checkpoint storage: model weights an evaluation can load on their own, plus the state to resume training.

This module only stores and checks files (it builds no model: :func:`ivtlr.loading.load_checkpoint` does).

A checkpoint is a directory ``checkpoint-<step>`` holding

- the trained weights: the PEFT adapter (``adapter_model.safetensors``) for a LoRA run, the full model
  (``model.safetensors`` + ``config.json``) otherwise;
- the processor and its tokenizer (``save_pretrained``), latent tokens included;
- ``ivtlr.json``: what :func:`ivtlr.loading.load_checkpoint` needs to rebuild the engine without the training config
  (base model, latent token ids, K, number of latents, positions, patch order, mode, image size), the training
  position, a manifest of every file with its size and SHA-256 digest, and the digest of the description itself;
- ``training_state/``: optimizer, scheduler and RNG states (``ivtlr.training.state``), all readable with
  ``torch.load(weights_only=True)``.

It is written to a hidden sibling directory, flushed to disk and renamed into place, so a directory named
``checkpoint-<step>`` is always complete; the manifest catches files damaged later, even damage that keeps a file's
size. Format 1 (before digests: sizes only) is still read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ivtlr.errors import NoSpaceLeft, UserError, is_out_of_space

logger = logging.getLogger(__name__)

META_FILE = "ivtlr.json"
TRAINING_STATE_DIR = "training_state"
ADAPTER_FILE = "adapter_model.safetensors"
FULL_WEIGHTS_FILE = "model.safetensors"
#: 2: the manifest records each file's SHA-256 digest and ``ivtlr.json`` its own; 1: sizes only (still read).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
DESCRIPTION_DIGEST_KEY = "description_sha256"
#: Test hook, off unless set: ``IVTLR_FAULT_AT=n`` ends the process at the n-th checkpoint sub-step (see fault_point).
FAULT_ENV = "IVTLR_FAULT_AT"
FAULT_EXIT_CODE = 86
_NAME = re.compile(r"^checkpoint-(\d+)$")
_ADAPTER_KEY_MARKERS = ("lora_", "trainable_tokens")
_HASH_CHUNK = 1 << 22
_fault_points_passed: list[str] = []


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that is missing, incomplete or damaged; the message names the file."""


@dataclass
class CheckpointMeta:
    """Contents of ``ivtlr.json``."""

    base_model: str  # hub id, local directory or tiny:<family>
    model_type: str
    weights: str  # "lora" (PEFT adapter) or "full"
    latent_token_id: int
    start_latent_id: int
    end_latent_id: int
    num_selected_patches: int  # K
    n_latent: int  # latent slots per question at the stage the checkpoint was trained at
    latents_per_step: int
    positions: str
    patch_order: str
    mode: str
    image_size: int | None
    base_seed: int  # seed the tiny base model was built with (unused for real checkpoints)
    stage: int
    epoch: int  # next epoch to train
    batch: int  # global micro-batches of `epoch` already trained
    step: int  # optimizer steps taken
    global_batch_size: int  # samples per micro-batch over all processes
    # relative path -> {"size": bytes, "sha256": hex digest} (format 1 checkpoints: size only)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    vision_bottleneck: bool = False  # later rows see the image only through inserted patches


def fault_point(label: str) -> None:
    """Test hook for crash safety, a no-op unless ``IVTLR_FAULT_AT`` is set: count checkpoint sub-steps (writing,
    flushing, renaming, pruning) and end the process with ``os._exit(FAULT_EXIT_CODE)`` at the n-th, as a kill there
    would (no cleanup runs). tests/test_train_faults.py re-runs training after each and compares the weights."""
    at = os.environ.get(FAULT_ENV)
    if not at:
        return
    _fault_points_passed.append(label)
    if len(_fault_points_passed) == int(at):
        logger.warning("%s=%s: ending the process at checkpoint sub-step '%s'", FAULT_ENV, at, label)
        logging.shutdown()
        os._exit(FAULT_EXIT_CODE)


def fault_points_passed() -> list[str]:
    """Labels of the sub-steps counted so far by :func:`fault_point` in this process (empty when the hook is off)."""
    return list(_fault_points_passed)


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (hidden temporary directories are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Read ``ivtlr.json``, check it against its own digest, and check every file of the manifest is present with its
    recorded size. Hashes no file: :func:`verify_checkpoint` also checks the contents."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file} is missing: {path} is not a complete ivtlr checkpoint")
    try:
        meta = _meta_from_dict(json.loads(meta_file.read_text()), meta_file)
    except (ValueError, TypeError, AttributeError) as error:  # JSON, UTF-8, fields
        raise CheckpointError(f"{meta_file} is not a valid checkpoint description ({error})") from error
    for name, entry in meta.files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if file.stat().st_size != entry["size"]:
            raise CheckpointError(f"checkpoint file {file} has {file.stat().st_size} bytes, expected {entry['size']} "
                                  "(truncated or overwritten)")
    return meta


def _meta_from_dict(data: dict[str, Any], meta_file: Path) -> CheckpointMeta:
    """The description of either readable format; format 2 must match its own digest, so an edited or damaged
    value (an epoch, a digest) is caught even when the JSON still parses."""
    version = data.get("format_version")
    if version not in READABLE_FORMATS:
        raise CheckpointError(f"{meta_file}: format version {version!r}, this ivtlr reads {READABLE_FORMATS} "
                              "(written by a newer ivtlr? upgrade it)")
    if version >= 2:
        recorded = data.pop(DESCRIPTION_DIGEST_KEY, None)
        if recorded != _description_digest(data):
            raise CheckpointError(f"{meta_file} does not match its own SHA-256 digest: it was damaged or edited after "
                                  "the checkpoint was written; use an earlier checkpoint")
    else:
        data["files"] = {name: {"size": int(size)} for name, size in data.get("files", {}).items()}
    return CheckpointMeta(**data)


def _description_digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _describe(meta: CheckpointMeta) -> str:
    """``ivtlr.json`` text: the fields plus the digest of their canonical JSON."""
    data = dataclasses.asdict(meta)
    return json.dumps({**data, DESCRIPTION_DIGEST_KEY: _description_digest(data)}, indent=2)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _in_training_state(name: str) -> bool:
    return Path(name).parts[0] == TRAINING_STATE_DIR


def verify_checkpoint(path: str | os.PathLike, *, training_state: bool = False) -> CheckpointMeta:
    """:func:`read_meta`, then every file's contents against its SHA-256 digest (format 2), so damage that keeps a
    file's size is caught. The training state (twice the model for full fine-tuning) only with ``training_state``:
    resuming reads it, loading the weights does not."""
    path = Path(path)
    meta = read_meta(path)
    for name, entry in meta.files.items():
        if "sha256" not in entry or (_in_training_state(name) and not training_state):
            continue
        file = path / name
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {file} does not match its SHA-256 digest in {path / META_FILE}: "
                                  "it was damaged or changed after it was written; use an earlier checkpoint")
    return meta


def training_state_dir(path: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """The ``training_state/`` directory of checkpoint ``path``, refusing any file its manifest does not list: ivtlr
    did not write it, and nothing placed there is read."""
    directory = Path(path) / TRAINING_STATE_DIR
    for file in sorted(directory.rglob("*")):
        if file.is_file() and str(file.relative_to(path)) not in meta.files:
            raise CheckpointError(f"{file} is not in the manifest of {Path(path) / META_FILE}: ivtlr did not write it "
                                  "and will not load it; remove it (or the whole checkpoint) to resume")
    return directory


def safe_load(file: Path, *, allowed_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU: tensors, numbers, strings and containers (plus
    ``allowed_globals``), so a pickle placed in a run directory cannot run code. Anything else is refused, naming
    the file."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to decode (a global not allowed, a damaged zip) refuses the file
        raise CheckpointError(f"{file} cannot be loaded safely ({_load_failure(error)}): ivtlr writes only tensors "
                              "and plain values there; delete the checkpoint directory holding it to resume from an "
                              "earlier one") from error


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint file {file} cannot be read ({error})") from error


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): give each repeat its own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state.items():
        value = value.detach().contiguous()
        where = (value.data_ptr(), value.numel())
        out[key] = value.clone() if where in seen else value
        seen.add(where)
    return out


def _load_failure(error: Exception) -> str:
    """The telling line of a ``torch.load`` error (for a refused pickle, the global it named)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line]
    return (named or lines or [type(error).__name__])[0]


def load_weights(model: nn.Module, path: str | os.PathLike, meta: CheckpointMeta | None = None) -> CheckpointMeta:
    """Load a checkpoint's trained weights into ``model``, built as the checkpoint's run built it (LoRA or not).

    ``meta``: what :func:`verify_checkpoint` returned for ``path`` (its files are then not hashed again)."""
    from peft import PeftModel, set_peft_model_state_dict

    path = Path(path)
    meta = meta or verify_checkpoint(path)
    is_peft = isinstance(model, PeftModel)
    if (meta.weights == "lora") != is_peft:
        raise CheckpointError(f"{path} holds {meta.weights} weights but the model is "
                              f"{'LoRA-wrapped' if is_peft else 'not LoRA-wrapped'}; set use_lora to match")
    if is_peft:
        result = set_peft_model_state_dict(model, _read_safetensors(path / ADAPTER_FILE))
        missing = [k for k in result.missing_keys if any(marker in k for marker in _ADAPTER_KEY_MARKERS)]
        if result.unexpected_keys or missing:
            raise CheckpointError(f"{path / ADAPTER_FILE} does not fit the model: unexpected "
                                  f"{result.unexpected_keys[:3]}, missing {missing[:3]} (different LoRA settings?)")
    else:
        try:
            model.load_state_dict(_read_safetensors(path / FULL_WEIGHTS_FILE), strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"the weights in {path} do not fit the model ({error})") from error
    return meta


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory under ``path`` (and ``path`` itself) to disk."""
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(path: Path) -> dict[str, dict[str, Any]]:
    return {str(file.relative_to(path)): {"size": file.stat().st_size, "sha256": _sha256(file)}
            for file in sorted(path.rglob("*")) if file.is_file() and file.name != META_FILE}


def _remove(path: Path) -> None:
    """Hide a directory by renaming it first, so an interrupted deletion never leaves a checkpoint-looking dir."""
    hidden = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(hidden, ignore_errors=True)
    path.rename(hidden)
    fault_point(f"{path.name} hidden for deletion")
    shutil.rmtree(hidden)
    fault_point(f"{path.name} deleted")


def _temporary_dir(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place."""
    return root / f".tmp-checkpoint-{step:08d}"


def clean_temporary_dirs(root: str | os.PathLike) -> None:
    """Delete what interrupted saves left behind (hidden directories, never complete checkpoints)."""
    root = Path(root)
    if root.is_dir():
        for stale in root.glob(".*checkpoint-*"):
            logger.info("removing unfinished checkpoint directory %s", stale)
            shutil.rmtree(stale)


def save_checkpoint(accelerator, engine: nn.Module, processor, meta: CheckpointMeta, root: str | os.PathLike,
                    save_training_state: Callable[[Path], None], keep_last: int | None = None) -> Path:
    """Write a checkpoint of the prepared ``engine``; every process must call it (weights are gathered under
    FSDP / DeepSpeed and each process saves its own RNG state). ``save_training_state(directory)`` writes the
    optimizer, scheduler and RNG states (``ivtlr.training.state``) on every process."""
    root = Path(root)
    tmp = _temporary_dir(root, meta.step)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            fault_point("temporary directory created")
        accelerator.wait_for_everyone()
        state = accelerator.get_state_dict(engine)
        if accelerator.is_main_process:
            _save_weights(accelerator.unwrap_model(engine).base_model, state, tmp)
            fault_point("weights written")
            processor.save_pretrained(str(tmp))
            fault_point("processor written")
        save_training_state(tmp / TRAINING_STATE_DIR)
    except Exception as error:
        if not is_out_of_space(error, root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"{previous.name} is intact and resumable" if previous else "no earlier checkpoint exists"
        raise NoSpaceLeft(f"no space left on the device of {root} while writing checkpoint step {meta.step} "
                          f"({type(error).__name__}: {error}); the incomplete copy was removed and {kept}: free "
                          "space and rerun the same command to resume") from error
    accelerator.wait_for_everyone()
    final = _finalize(tmp, meta, keep_last) if accelerator.is_main_process else root / f"checkpoint-{meta.step:08d}"
    accelerator.wait_for_everyone()
    return final


def _save_weights(model: nn.Module, engine_state: dict[str, torch.Tensor], directory: Path) -> None:
    """The adapter of a PEFT model, else the full model, from the engine's (gathered) state dict."""
    from peft import PeftModel

    prefix = "base_model."  # IVTLR keeps the wrapped model under this attribute
    state = {key[len(prefix):]: value for key, value in engine_state.items() if key.startswith(prefix)}
    if isinstance(model, PeftModel):
        # The latent tokens' base rows are rebuilt by `add_latent_tokens`; only their trained deltas are saved.
        model.save_pretrained(str(directory), state_dict=state, safe_serialization=True, save_embedding_layers=False)
    else:
        # The model's own parameter names (not `save_pretrained`'s hub layout), so `load_state_dict` takes them as
        # they are; `from_pretrained` on the directory reads them too.
        model.config.save_pretrained(str(directory))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(directory))
        save_file(_unshared(state), str(directory / FULL_WEIGHTS_FILE), metadata={"format": "pt"})


def _finalize(tmp: Path, meta: CheckpointMeta, keep_last: int | None) -> Path:
    """Write ``ivtlr.json`` with the manifest, flush, rename ``tmp`` into place and prune old checkpoints."""
    meta = dataclasses.replace(meta, files=_manifest(tmp), format_version=FORMAT_VERSION)
    (tmp / META_FILE).write_text(_describe(meta))
    fault_point("description written")
    _fsync_tree(tmp)
    fault_point("flushed")
    final = tmp.with_name(f"checkpoint-{meta.step:08d}")
    if final.exists():
        _remove(final)
    tmp.rename(final)
    _fsync_dir(final.parent)
    fault_point("renamed into place")
    if keep_last is not None:
        _prune(final, keep_last)
    logger.info("saved checkpoint %s (epoch %d, step %d)", final, meta.epoch, meta.step)
    return final


def _prune(newest: Path, keep_last: int) -> None:
    """Keep ``newest`` (complete and flushed) and the ``keep_last - 1`` checkpoints before it. Checkpoints of later
    steps are left alone: they are what a resume skipped as damaged, and pruning by position among them could delete
    every intact checkpoint. Training replaces each when it saves that step again."""
    step = int(_NAME.match(newest.name).group(1))
    older = [path for path in checkpoint_dirs(newest.parent) if int(_NAME.match(path.name).group(1)) < step]
    for old in older[:max(len(older) - (keep_last - 1), 0)]:
        _remove(old)
