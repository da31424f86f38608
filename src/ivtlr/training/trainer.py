"""``Trainer``: the progressive IVT-LR curriculum on Accelerate.

The same loop runs on a CPU, one GPU, and under ``accelerate launch`` (DDP, FSDP, DeepSpeed ZeRO-2). Epoch ``e``
trains curriculum stage ``e // epochs_per_stage``. The loss of an optimizer step is the mean over every labelled
token of its accumulation window on every process, so the update does not depend on how a global batch is split
over processes and micro-batches. Checkpoints (``ivtlr.checkpoint``) are written at every stage end and every
``save_every_steps`` optimizer steps (every epoch end when that is null); re-running the same command continues
from the newest intact one (a damaged newer one is skipped with a warning). ``config.yaml`` is written only when
training proceeds, so re-running a finished run with other settings leaves the run's record alone; a continuation
with another ``lr``, ``weight_decay`` or ``warmup_steps`` trains with it from its next step (logged, and named in
that step's ``changed`` entry of metrics.jsonl). A step whose loss or gradient norm is inf/NaN stops the run with
one line (``on_nonfinite: skip`` skips its update instead), and weights an update turned inf/NaN are never saved.
One training at a time writes a run directory: it holds ``train.lock`` for its whole life. ``debug: true``
trains on the first examples only (two optimizer steps per epoch), writes metrics.jsonl but no checkpoint, and
neither resumes nor starts TensorBoard / wandb.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ivtlr.checkpoint import (CheckpointError, CheckpointMeta, checkpoint_dirs, clean_temporary_dirs, load_weights,
                              save_checkpoint, training_state_dir, verify_checkpoint)
from ivtlr.config import Config, ConfigError, save_config
from ivtlr.data import IGNORE_INDEX, Curriculum, CurriculumDataset, IVTLRCollator
from ivtlr.errors import UserError
from ivtlr.files import exclusive_lock
from ivtlr.metrics_log import MetricsLogger, tracker_names
from ivtlr.training.datasets import epoch_order, process_batches, training_examples
from ivtlr.training.model import build_training_model, fsdp_wrap_classes, latents_at_stage
from ivtlr.training.state import load_training_state, save_training_state

logger = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
#: Held (flock) by the training writing the run directory, for the whole run; names its process.
LOCK_FILE = "train.lock"
#: A debug run trains on this many optimizer steps' worth of examples per epoch and saves no checkpoint.
DEBUG_STEPS_PER_EPOCH = 2


class RunBusy(UserError):
    """Another process is training into the same run directory."""


class NonFiniteTraining(UserError):
    """The loss, a gradient norm or the weights turned inf/NaN (the lr, the data or the model are at fault)."""


@dataclass
class Progress:
    """Where training stands: the epoch in progress, its global micro-batches done, optimizer steps done."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps taken by this call
    checkpoint: Path | None  # the newest checkpoint of the run
    samples_per_s: float  # over this call's steps


class Trainer:
    """Train ``config`` (see ``ivtlr.config.Config`` for every key); call :meth:`train` once."""

    def __init__(self, config: Config):
        self.config = config
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision="bf16" if config.bf16 else "no",
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False),
            log_with=None if config.debug else tracker_names(config.log_with) or None,
            project_dir=str(config.run_dir),
            # Full fine-tuning includes weights no loss reaches (Chameleon's VQ encoder); LoRA's all get gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not config.use_lora)],
        )
        if config.on_nonfinite == "skip" and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError("on_nonfinite: skip cannot skip a step under DeepSpeed, whose engine updates the "
                              "weights inside backward, before the loss is checked: use on_nonfinite: stop")
        self.checkpoint_root = config.run_dir / CHECKPOINTS_DIR
        self.global_batch = config.batch_size_training * self.accelerator.num_processes
        self.curriculum = Curriculum(epochs_per_stage=config.epochs_per_stage,
                                     max_latent_stage=config.max_latent_stage,
                                     pad_latent_to_max=config.pad_latent_to_max,
                                     latents_per_step=config.latents_per_step, mode=config.mode)

    # ------------------------------------------------------------------------------------------------ setup
    def _checkpoint_to_resume(self) -> tuple[Path | None, CheckpointMeta | None]:
        """The newest intact checkpoint to continue (``resume: E``: the newest that ended epoch E-1), and its
        verified description. Damaged ones are skipped with a warning; if some were and none is intact, an error."""
        config = self.config
        if config.debug:
            return None, None
        damaged = []
        for path in reversed(checkpoint_dirs(self.checkpoint_root)):
            try:
                meta = verify_checkpoint(path, training_state=True)
            except CheckpointError as error:
                logger.warning("skipping damaged checkpoint %s: %s", path, error)
                damaged.append(f"{path.name}: {error}")
                continue
            if not config.resume or (meta.epoch == config.resume and meta.batch == 0):
                if damaged:
                    logger.warning("resuming from %s, the newest intact checkpoint (skipped %d newer)", path,
                                   len(damaged))
                return path, meta
        if damaged:
            wanted = f"of the end of epoch {config.resume - 1} " if config.resume else ""
            raise CheckpointError(f"no intact checkpoint {wanted}to resume in {self.checkpoint_root}; skipped as "
                                  f"damaged: {'; '.join(damaged)}. Restore them, or delete them to train from the "
                                  "start")
        if config.resume:
            # With load_model_path this is the documented way to continue another run's checkpoint at epoch E;
            # without it, training a later stage from the bare base model is more likely a mistake.
            log = logger.info if config.load_model_path else logger.warning
            log("resume=%d: no checkpoint of the end of epoch %d in %s; epoch %d starts from %s", config.resume,
                config.resume - 1, self.checkpoint_root, config.resume, config.load_model_path or config.model)
        return None, None

    def _record_config(self, progress: Progress) -> None:
        """Write ``config.yaml`` when this call trains, warning about settings that differ from the run's saved
        ones; when every epoch is done already, keep the run's own record and say what was not applied."""
        path = self.config.run_dir / CONFIG_FILE
        changed = changed_settings(path, self.config)
        if progress.epoch >= self.config.num_epochs:
            if changed:
                logger.warning("every epoch of %s is trained already: nothing trains, so these settings were not "
                               "applied and %s keeps the run's own: %s. To train with them, choose another name or "
                               "save_path (or raise num_epochs)", self.config.run_dir, path, changed)
            return
        record_config(self.config, changed)

    def _prepare_distributed(self, model) -> None:
        acc = self.accelerator
        if acc.distributed_type == DistributedType.FSDP and acc.state.fsdp_plugin.transformer_cls_names_to_wrap is None:
            acc.state.fsdp_plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # No dataloader goes through `prepare`, so DeepSpeed learns the micro-batch size here.
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
                self.config.batch_size_training
        # The model weights are saved by the checkpoint itself (adapter or full model); `save_state` keeps the rest.
        acc.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        acc.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    # ------------------------------------------------------------------------------------------------ training
    def train(self) -> TrainResult:
        """Train (or continue) the run, holding its directory's lock throughout."""
        with self._run_lock():
            return self._train()

    @contextmanager
    def _run_lock(self) -> Iterator[None]:
        """Hold the run directory's lock (on the main process) for the whole run: a second training into the same
        directory would interleave metrics.jsonl and overwrite checkpoints. Every process stops if another run
        holds it, before anything is written."""
        acc, run_dir = self.accelerator, self.config.run_dir
        with ExitStack() as stack:
            refusal = None
            if acc.is_main_process:
                try:
                    stack.enter_context(exclusive_lock(run_dir / LOCK_FILE, lambda holder: RunBusy(
                        f"{run_dir} is being trained by {holder}; wait for it to finish, or choose another name or "
                        "save_path")))
                except RunBusy as error:
                    refusal = str(error)
            [refusal] = broadcast_object_list([refusal])
            if refusal is not None:
                raise RunBusy(refusal)
            yield

    def _train(self) -> TrainResult:
        config, acc = self.config, self.accelerator
        set_seed(config.seed)
        if acc.is_main_process:
            clean_temporary_dirs(self.checkpoint_root)
        acc.wait_for_everyone()
        checkpoint, meta = self._checkpoint_to_resume()
        debug_limit = DEBUG_STEPS_PER_EPOCH * self.global_batch * config.gradient_accumulation_steps
        with acc.main_process_first():
            examples = training_examples(config, limit=debug_limit if config.debug else None)
        components, engine = build_training_model(config)
        progress = Progress(epoch=config.resume)
        if checkpoint is not None:
            load_weights(components.model, checkpoint, meta)
            if meta.batch and meta.global_batch_size != self.global_batch:
                raise ValueError(f"{checkpoint} stopped mid-epoch with global batch {meta.global_batch_size}; "
                                 f"resuming it needs the same (now {self.global_batch})")
            progress = Progress(meta.epoch, meta.batch, meta.step)
            logger.info("resuming from %s: epoch %d, batch %d, step %d", checkpoint, *vars(progress).values())
        elif config.load_model_path:
            load_weights(components.model, config.load_model_path)
            logger.info("initial weights from %s", config.load_model_path)
        self._prepare_distributed(components.model)
        optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=config.weight_decay)
        # Stepped here once per optimizer step (a prepared scheduler would step once per process).
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)
        engine, optimizer = acc.prepare(engine, optimizer)
        changed: dict[str, list[float]] = {}
        if checkpoint is not None:
            load_training_state(acc, optimizer, scheduler, training_state_dir(checkpoint, meta), meta)
            changed = _apply_optimisation_settings(scheduler, config)
            if changed:
                logger.info("from step %d: %s", progress.step + 1,
                            ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()))
        if acc.is_main_process:
            self._record_config(progress)
        text_config = components.model.config.get_text_config()
        collator = IVTLRCollator(components.processor, components.latent_token_id, image_size=config.image_size,
                                 max_length=config.max_length or text_config.max_position_embeddings,
                                 skip_too_long=True, step_targets=config.step_supervision > 0,
                                 step_regions=config.region_supervision > 0)
        run = _Run(self, engine, optimizer, scheduler, components, CurriculumDataset(examples, self.curriculum),
                   collator, progress, checkpoint, changed)
        result = run.epochs()
        acc.end_training()
        return result


class _Run:
    """The state of one ``Trainer.train`` call: the prepared objects, the progress and the logging sinks."""

    def __init__(self, trainer: Trainer, engine, optimizer, scheduler, components, dataset: CurriculumDataset,
                 collator: IVTLRCollator, progress: Progress, checkpoint: Path | None,
                 changed: dict[str, list[float]]):
        self.trainer, self.config, self.acc = trainer, trainer.config, trainer.accelerator
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self.components, self.dataset, self.collator, self.progress = components, dataset, collator, progress
        self.checkpoint = checkpoint  # the newest intact checkpoint: the one resumed, then each one saved
        self.changed = changed  # settings changed at this continuation, recorded with its first step
        self.metrics = MetricsLogger(self.acc, self.config.run_dir, jsonl="jsonl" in self.config.log_with,
                                     project=self.config.project, run_name=self.config.name,
                                     config=self.config.to_dict(), start_step=progress.step)

    def _batches(self, epoch: int) -> list[list[int]]:
        order = epoch_order(len(self.dataset), self.config.seed, epoch)
        return process_batches(order, self.trainer.global_batch, self.acc.num_processes, self.acc.process_index)

    def epochs(self) -> TrainResult:
        config, progress, curriculum = self.config, self.progress, self.trainer.curriculum
        accumulation = config.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(self._batches(0)) / accumulation)
        # Only the steps this run will take: a continuation (resume=E without a checkpoint) starts at step 0.
        steps_left = (steps_per_epoch * max(config.num_epochs - progress.epoch, 0)
                      - math.ceil(progress.batch / accumulation))
        # Closed also when a step fails, so that the error is the last line a terminal shows.
        bar = tqdm(total=progress.step + steps_left, initial=progress.step, desc=config.name,
                   disable=not self.acc.is_local_main_process, dynamic_ncols=True)
        first_step, start_time, samples = progress.step, time.perf_counter(), 0
        if progress.epoch >= config.num_epochs:
            logger.info("all %d epochs are trained already (%s)", config.num_epochs, self.checkpoint)
        with bar:
            for epoch in range(progress.epoch, config.num_epochs):
                stage = curriculum.stage(epoch)
                self.dataset.set_epoch(epoch)
                if config.reset_optimizer and progress.batch == 0 and epoch and curriculum.stage(epoch - 1) != stage:
                    _reset_optimizer_state(self.optimizer)
                    logger.info("stage %d: optimizer state reset", stage)
                batches = self._batches(epoch)
                # Its own generator: creating the loader must not draw from the global RNG that dropout uses, or a run
                # resumed mid-epoch would draw different masks than the uninterrupted one.
                loader = iter(DataLoader(self.dataset, batch_sampler=batches[progress.batch:],
                                         collate_fn=self.collator, num_workers=config.num_workers,
                                         generator=torch.Generator().manual_seed(epoch)))
                done = progress.batch
                while done < len(batches):
                    started = time.perf_counter()
                    window = [next(loader) for _ in range(min(accumulation, len(batches) - done))]
                    stats = self._optimizer_step(window)
                    stats["samples_per_s"] = stats["samples"] / (time.perf_counter() - started)  # data loading included
                    done += len(window)
                    epoch_done = done == len(batches)
                    progress.epoch, progress.batch = (epoch + 1, 0) if epoch_done else (epoch, done)
                    progress.step += 1
                    samples += stats["samples"]
                    record = {"step": progress.step, "epoch": epoch, "stage": stage, **stats}
                    if self.changed:
                        record["changed"], self.changed = self.changed, {}
                    self.metrics.log(record)
                    bar.update(1)
                    bar.set_postfix({"stage": stage, "epoch": epoch, "loss": f"{stats['loss']:.4f}",
                                     "lr": f"{stats['lr']:.2e}", "samples/s": f"{stats['samples_per_s']:.1f}"})
                    if self._save_due(epoch, epoch_done):
                        self._save(stage)
        if self.collator.skipped_too_long:
            logger.warning("%d samples longer than max_length were skipped", self.collator.skipped_too_long)
        elapsed = time.perf_counter() - start_time
        return TrainResult(run_dir=config.run_dir, steps=progress.step - first_step, checkpoint=self.checkpoint,
                           samples_per_s=samples / elapsed if samples else 0.0)

    def _optimizer_step(self, window: list[dict[str, torch.Tensor]]) -> dict:
        """Forward and backward every micro-batch of ``window``, then one clipped optimizer step."""
        acc = self.acc
        # `accumulate` syncs gradients when its counter reaches the accumulation count: make that the window's last
        # micro-batch, also for the shorter last window of an epoch.
        acc.step = acc.gradient_accumulation_steps - len(window)
        tokens = [int((batch["labels"] != IGNORE_INDEX).sum()) for batch in window]
        window_tokens = acc.reduce(torch.tensor(sum(tokens), device=acc.device), "sum")
        # Backward of sum(token losses) * scale: Accelerate divides by the accumulation count and DDP averages
        # over processes, which leaves the mean over the window's labelled tokens on all processes.
        scale = acc.num_processes * acc.gradient_accumulation_steps / window_tokens
        # summed token loss, samples, latent slots; summed step loss, its micro-batches; the same for the region loss
        totals = torch.zeros(7, device=acc.device)
        for batch, n_tokens in zip(window, tokens):
            # Ids, mask, labels and whatever the family's processor returned: the engine hands the rest to the backbone.
            inputs = {key: value.to(acc.device) for key, value in batch.items()}
            with acc.accumulate(self.engine):
                output = self.engine(**inputs)
                token_loss = output.loss * n_tokens
                # The supervision losses are means per micro-batch, averaged over the window (backward divides by the
                # accumulation count, which the factor undoes) and, under DDP, over processes.
                supervision = self._supervision_loss(output) * (acc.gradient_accumulation_steps / len(window))
                acc.backward(token_loss * scale + supervision)
            latents = (inputs["input_ids"] == self.components.latent_token_id).sum()
            step, region = output.step_loss, output.region_loss
            totals += torch.stack([token_loss.detach().float(), torch.tensor(len(inputs["input_ids"])).to(totals),
                                   latents.to(totals),
                                   step.detach().float() if step is not None else totals.new_zeros(()),
                                   totals.new_tensor(float(step is not None)),
                                   region.detach().float() if region is not None else totals.new_zeros(()),
                                   totals.new_tensor(float(region is not None))])
        grad_norm = clip_gradients(acc, self.engine, self.config.max_grad_norm)
        loss, samples, latents, step_sum, step_count, region_sum, region_count = acc.reduce(totals, "sum").tolist()
        loss /= float(window_tokens)
        lr = self.scheduler.get_last_lr()[0]
        finite = step_if_finite(self.optimizer, self.scheduler, loss, grad_norm, step=self.progress.step + 1,
                                on_nonfinite=self.config.on_nonfinite, newest=self.checkpoint,
                                advice="Lower lr, check the data")
        stats = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "samples": int(samples),
                 "latents": latents / samples}
        if not finite:
            stats["skipped"] = True
        if self.config.step_supervision:
            stats["step_loss"] = step_sum / step_count if step_count else None
        if self.config.region_supervision:
            stats["region_loss"] = region_sum / region_count if region_count else None
        return stats

    def _supervision_loss(self, output) -> torch.Tensor:
        """The weighted step and region losses of one micro-batch (0 where it has none to give)."""
        total = output.loss.new_zeros(())
        if output.step_loss is not None:
            total = total + self.config.step_supervision * output.step_loss
        if output.region_loss is not None:
            total = total + self.config.region_supervision * output.region_loss
        return total

    # ------------------------------------------------------------------------------------------------ saving
    def _save_due(self, epoch: int, epoch_done: bool) -> bool:
        config, curriculum = self.config, self.trainer.curriculum
        if config.debug:
            return False
        if config.save_every_steps and self.progress.step % config.save_every_steps == 0:
            return True
        stage_done = epoch + 1 == config.num_epochs or curriculum.stage(epoch + 1) != curriculum.stage(epoch)
        return epoch_done and (stage_done or config.save_every_steps is None)

    def _save(self, stage: int) -> None:
        refuse_nonfinite_weights(self.acc, self.engine, self.progress.step, self.checkpoint, self.config.lr)
        config, engine = self.config, self.acc.unwrap_model(self.engine)
        progress, components = self.progress, self.components
        meta = CheckpointMeta(
            base_model=config.model, model_type=components.model_type,
            weights="lora" if config.use_lora else "full", latent_token_id=components.latent_token_id,
            start_latent_id=components.start_latent_id, end_latent_id=components.end_latent_id,
            num_selected_patches=engine.num_selected_patches, n_latent=latents_at_stage(config, stage),
            latents_per_step=config.latents_per_step, positions=config.positions, patch_order=config.patch_order,
            mode=config.mode, image_size=config.image_size, base_seed=config.seed, stage=stage,
            vision_bottleneck=config.vision_bottleneck,
            epoch=progress.epoch, batch=progress.batch, step=progress.step,
            global_batch_size=self.trainer.global_batch)
        self.checkpoint = save_checkpoint(
            self.acc, self.engine, components.processor, meta, self.trainer.checkpoint_root,
            lambda directory: save_training_state(self.acc, self.scheduler, directory), keep_last=config.keep_last)


def record_config(config: Config, changed: str | None = None) -> None:
    """Write the run's ``config.yaml`` (atomically), first warning about the settings that differ from the one it
    replaces (``changed``: :func:`changed_settings`, computed here when not given)."""
    path = config.run_dir / CONFIG_FILE
    changed = changed_settings(path, config) if changed is None else changed
    if changed:
        logger.warning("continuing %s with settings that differ from its %s: %s", config.run_dir, path, changed)
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    save_config(config, tmp)
    os.replace(tmp, path)


def clip_gradients(acc, engine, max_grad_norm: float | None) -> float | None:
    """Clip the gradients to ``max_grad_norm`` (none: only measure); their norm before clipping, as a float."""
    grad_norm = acc.clip_grad_norm_(engine.parameters(), max_grad_norm or math.inf)
    if grad_norm is None:
        return None
    return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)


def step_if_finite(optimizer, scheduler, loss: float, grad_norm: float | None, *, step: int, on_nonfinite: str,
                   newest: Path | None, advice: str) -> bool:
    """One optimizer step, unless the (process-reduced) loss or gradient norm is inf/NaN: then stop the run with one
    line (``on_nonfinite: stop``, ``advice`` saying what to lower) or skip the update (``skip``). The scheduler
    steps either way; returns whether the weights were updated. Equal on every process, so all stop or skip
    together."""
    finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
    if not finite and on_nonfinite == "stop":
        raise NonFiniteTraining(
            f"step {step} has a non-finite loss ({loss}) or gradient norm ({grad_norm}) at lr "
            f"{scheduler.get_last_lr()[0]:g}: training stopped before updating or saving (newest checkpoint: "
            f"{newest}). {advice}, or set on_nonfinite: skip to skip such steps; rerun to continue")
    if finite:
        optimizer.step()
    else:
        logger.warning("step %d skipped (on_nonfinite: skip): loss %s, gradient norm %s", step, loss, grad_norm)
    scheduler.step()
    optimizer.zero_grad()
    return finite


def refuse_nonfinite_weights(acc, engine, step: int, newest: Path | None, lr: float) -> None:
    """Refuse to save weights an update turned inf/NaN (its loss was still finite): the newest checkpoint must stay
    one a rerun can continue from."""
    bad = [name for name, p in acc.unwrap_model(engine).named_parameters()
           if p.requires_grad and not torch.isfinite(p).all()]
    count = int(acc.reduce(torch.tensor(len(bad), device=acc.device), "sum"))
    if count:
        raise NonFiniteTraining(
            f"step {step} left non-finite weights in {count} tensors (first: "
            f"{bad[0] if bad else 'on another process'}); their checkpoint was not written (newest: {newest}). "
            f"Lower lr (now {lr:g}) and rerun to continue from it")


def _apply_optimisation_settings(scheduler, config: Config) -> dict[str, list[float]]:
    """Set the configured ``lr`` and ``weight_decay`` over the ones a checkpoint's optimizer and scheduler states
    brought back, so that a continued run trains with what its config.yaml records; the current lr is recomputed
    from the step count, which also applies a changed ``warmup_steps`` (the schedule's own setting). Returns
    ``{key: [restored, now]}`` for each that changed."""
    groups = scheduler.optimizer.param_groups
    restored = {"lr": scheduler.base_lrs[0], "weight_decay": groups[0]["weight_decay"]}
    for group in groups:
        group["initial_lr"], group["weight_decay"] = config.lr, config.weight_decay
    scheduler.base_lrs = [config.lr] * len(groups)
    scheduler.last_epoch -= 1
    scheduler.step()  # the same step count again: the lr of the next step from the new base lr and warmup
    now = {"lr": config.lr, "weight_decay": config.weight_decay}
    return {key: [restored[key], now[key]] for key in now if restored[key] != now[key]}


def _reset_optimizer_state(optimizer) -> None:
    """Forget AdamW's moments (the original's ``reset_optimizer``): under Accelerate / DeepSpeed wrappers the torch
    optimizer is the innermost ``.optimizer``."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    inner.state.clear()


def changed_settings(path: Path, config: Config) -> str:
    """``key: saved -> now`` for each setting of ``config`` that differs from the YAML at ``path`` ('' if none or no
    file)."""
    if not path.is_file():
        return ""
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        return f"{path} is unreadable ({error})"
    if not isinstance(saved, dict):
        return f"{path} holds no settings"
    saved, now = _flat(saved), _flat(config.to_dict())
    keys = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
    return ", ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in keys)


def _flat(section: dict, prefix: str = "") -> dict:
    """Nested config sections -> ``section.key`` entries."""
    flat = {}
    for key, value in section.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def train(config: Config) -> TrainResult:
    """Run a training configuration to its end (or continue it from its newest checkpoint)."""
    return Trainer(config.check_values()).train()
