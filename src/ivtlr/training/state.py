"""Optimizer, scheduler and RNG states in a checkpoint's ``training_state/``, read back with
``torch.load(weights_only=True)`` only, so a pickle placed in a run directory is refused and never run.

Accelerate writes the optimizer state (as the backend needs: one file, FSDP, DeepSpeed). ivtlr writes the scheduler
state and each process's RNG states itself as tensors and plain values: Accelerate's own files for those need
numpy objects (RNG) or ``weights_only=False`` (registered objects). Format 1 checkpoints, written with those
files, are still resumed: their scheduler state is plain, and their RNG file needs only numpy's array types.
"""
from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import DistributedType

from ivtlr.checkpoint import CheckpointError, CheckpointMeta, fault_point, safe_load

OPTIMIZER_FILE = "optimizer.bin"  # Accelerate's name
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state_{}.pt"  # per process index
LEGACY_SCHEDULER_FILE = "custom_checkpoint_0.pkl"  # format 1: Accelerate's register_for_checkpointing
LEGACY_RNG_FILE = "random_states_{}.pkl"  # format 1 (and what Accelerate's save_state writes)
#: Backends whose optimizer state Accelerate must load itself (sharded, or inside DeepSpeed's own files).
_BACKEND_LOADED = (DistributedType.FSDP, DistributedType.DEEPSPEED)
#: What Accelerate's RNG file holds besides plain values: a numpy array of the MT19937 key.
_NUMPY_GLOBALS = ((np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct, np.ndarray, np.dtype,
                  type(np.dtype(np.uint32)))
#: Classes DeepSpeed's optimizer files hold (allowed by name; not exercised here: DeepSpeed needs GPUs).
_DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")


def save_training_state(accelerator, scheduler, directory: Path) -> None:
    """Write the training state of this process into ``directory``; every process calls it."""
    accelerator.save_state(str(directory))
    fault_point("optimizer state written")
    rank = accelerator.process_index
    (directory / LEGACY_RNG_FILE.format(rank)).unlink(missing_ok=True)  # replaced by the plain file below
    torch.save(_rng_state(), directory / RNG_FILE.format(rank))
    fault_point("RNG state written")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
        fault_point("scheduler state written")


def load_training_state(accelerator, optimizer, scheduler, directory: Path, meta: CheckpointMeta) -> None:
    """Restore what :func:`save_training_state` wrote (or a format 1 checkpoint's Accelerate files). ``directory``
    comes from ``checkpoint.training_state_dir`` (no unlisted file) of a checkpoint ``verify_checkpoint`` passed."""
    legacy = meta.format_version < 2
    if accelerator.distributed_type in _BACKEND_LOADED:
        _load_backend_state(accelerator, directory, legacy)
    else:
        _apply(directory / OPTIMIZER_FILE, optimizer.load_state_dict)
    _apply(directory / (LEGACY_SCHEDULER_FILE if legacy else SCHEDULER_FILE), scheduler.load_state_dict)
    rank = accelerator.process_index
    if legacy:
        _apply(directory / LEGACY_RNG_FILE.format(rank), lambda state: _set_rng_state(_from_accelerate(state)),
               _NUMPY_GLOBALS)
    else:
        _apply(directory / RNG_FILE.format(rank), _set_rng_state)


def _apply(file: Path, restore, allowed_globals: tuple = ()) -> None:
    """``restore(safe_load(file))``, a file holding something else than expected named in the error."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint's training state is incomplete; delete the "
                              "checkpoint directory to resume from an earlier one")
    state = safe_load(file, allowed_globals=allowed_globals)
    try:
        restore(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{file} does not hold the state this run needs ({type(error).__name__}: {error}); "
                              "was the run's configuration changed?") from error


def _load_backend_state(accelerator, directory: Path, legacy: bool) -> None:
    """FSDP / DeepSpeed: every file is first read with ``weights_only=True``, then Accelerate (and DeepSpeed) load
    them as they need."""
    if legacy:
        raise CheckpointError(f"{directory}: format 1 training state cannot be resumed safely under "
                              f"{accelerator.distributed_type}; start from its weights with load_model_path instead")
    allowed = _named_globals(_DEEPSPEED_GLOBALS) if accelerator.distributed_type == DistributedType.DEEPSPEED else []
    ours = {SCHEDULER_FILE} | {RNG_FILE.format(rank) for rank in range(accelerator.num_processes)}
    for file in sorted(directory.rglob("*")):
        if file.is_file() and file.suffix != ".safetensors" and file.name not in ours:
            safe_load(file, allowed_globals=allowed)
    accelerator.load_state(str(directory))


def _named_globals(names: tuple[str, ...]) -> list[Any]:
    found = []
    for dotted in names:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


def _rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and plain values."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _from_accelerate(states: dict[str, Any]) -> dict[str, Any]:
    """A format 1 RNG file (Accelerate's ``random_states_<i>.pkl``) in :func:`_rng_state`'s layout."""
    name, key, position, has_gauss, gauss = states["numpy_random_seed"]
    state = {"python": states["random_state"], "torch": states["torch_manual_seed"],
             "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "position": position,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if "torch_cuda_manual_seed" in states:
        state["cuda"] = states["torch_cuda_manual_seed"]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    numpy = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((numpy["name"], numpy["key"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
