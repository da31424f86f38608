"""``GRPOTrainer``: group relative policy optimisation on latent chains, on Accelerate.

Each rollout batch takes the next ``questions_per_step`` questions of the run's question stream on every process
(a permutation per pass over the training split, seeded by (seed, pass) alone), answers each ``group_size`` times with
the stochastic latent policy (``ivtlr.rl.rollouts``), scores the answers, normalises the rewards within each
question's group, and takes ``updates_per_rollout`` optimizer steps on the clipped ratio loss of every choice
(``ivtlr.rl.objective``), the new log-probabilities from a teacher-forced replay of the recorded draws. Dropout is
off throughout (the model stays in eval mode), so a replay at the rollout's weights gives the rollout's
log-probabilities and the first update's ratios are 1.

It is a :class:`~ivtlr.training.trainer.Trainer` with another loop: the same run directory lock, the same checkpoint
format (``ivtlr eval`` and ``ivtlr probe`` read an RL checkpoint like any other), the same resume (rerun the command:
it continues from the newest intact checkpoint, bit-identical to an uninterrupted run; checkpoints are written after
a rollout batch's updates only), the same non-finite guard and metrics sinks.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import DistributedType
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ivtlr.checkpoint import CheckpointMeta, clean_temporary_dirs, load_weights, read_meta, save_checkpoint, \
    training_state_dir
from ivtlr.config import Config, ConfigError
from ivtlr.data import ExampleSequence
from ivtlr.metrics_log import MetricsLogger
from ivtlr.method.policy import replay_unit_log_probs
from ivtlr.rl.objective import KindLoss, group_advantages, kind_loss
from ivtlr.rl.rollouts import Rollouts, draw_seed, roll_out
from ivtlr.training.datasets import epoch_order, training_examples
from ivtlr.training.model import build_training_model, latents_at_stage
from ivtlr.training.state import load_training_state, save_training_state
from ivtlr.training.trainer import Trainer, clip_gradients, record_config, refuse_nonfinite_weights, step_if_finite

logger = get_logger(__name__)

#: The kinds of choice, in the order metrics and losses list them.
KINDS = ("text", "latent", "patch")


@dataclass
class RLResult:
    run_dir: Path
    steps: int  # optimizer steps taken by this call
    checkpoint: Path | None  # the newest checkpoint of the run
    rollouts_per_s: float  # rollout answers generated per second over this call (rollout time only)


class GRPOTrainer(Trainer):
    """RL on ``config`` (``config.rl`` and the optimisation keys); call :meth:`train` once.

    One process or DDP: rollouts generate on each process's whole model, which FSDP and DeepSpeed ZeRO shard."""

    def __init__(self, config: Config):
        # A rollout batch is one optimizer step (split into passes by rl.questions_per_pass): Accelerate must not
        # divide the loss by training's gradient_accumulation_steps.
        super().__init__(replace(config, gradient_accumulation_steps=1))
        if config.resume:
            # A supervised run's config.yaml, copied for RL, says where its curriculum resumed: nothing RL uses.
            logger.warning("resume=%d ignored: ivtlr rl continues from the newest intact checkpoint of %s",
                           config.resume, config.run_dir)
        self.config = replace(config, resume=0)
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(f"ivtlr rl runs on one process or under DDP, not {self.accelerator.distributed_type}: "
                              "its rollouts generate with each process's whole model (configs/accelerate/ddp.yaml)")

    def _train(self) -> RLResult:
        config, acc, settings = self.config, self.accelerator, self.config.rl
        set_seed(config.seed)
        if acc.is_main_process:
            clean_temporary_dirs(self.checkpoint_root)
        acc.wait_for_everyone()
        checkpoint, meta = self._checkpoint_to_resume()
        with acc.main_process_first():
            examples = training_examples(config)
        components, engine = build_training_model(config)
        step = 0
        if checkpoint is not None:
            load_weights(components.model, checkpoint, meta)
            step = meta.step
            if step % settings.updates_per_rollout:
                raise ConfigError(f"{checkpoint} was saved after {step} optimizer steps, not a whole number of "
                                  f"rollout batches of rl.updates_per_rollout={settings.updates_per_rollout}: "
                                  "resume with the run's own setting")
            logger.info("resuming from %s: %d optimizer steps done", checkpoint, step)
        elif config.load_model_path:
            load_weights(components.model, config.load_model_path)
            logger.info("initial weights from %s", config.load_model_path)
        else:
            logger.warning("no load_model_path: RL starts from the base model %s, which has not learnt the latent "
                           "chain; RL is meant to follow ivtlr train", config.model)
        n_latent = _rl_latent_steps(config)
        reference = _reference_engine(config, acc.device) if settings.kl else None
        self._prepare_distributed(components.model)
        optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=config.weight_decay)
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)
        engine, optimizer = acc.prepare(engine, optimizer)
        if checkpoint is not None:
            load_training_state(acc, optimizer, scheduler, training_state_dir(checkpoint, meta), meta)
        if acc.is_main_process and step < settings.steps * settings.updates_per_rollout:
            record_config(config)
        loop = _Loop(self, engine, reference, optimizer, scheduler, components, examples, n_latent, step, checkpoint)
        result = loop.run()
        acc.end_training()
        return result


def _rl_latent_steps(config: Config) -> int:
    """``rl.n_latent``, else the starting checkpoint's latent steps, else the final curriculum stage's."""
    if config.rl.n_latent is not None:
        return config.rl.n_latent
    if config.load_model_path and (Path(config.load_model_path) / "ivtlr.json").is_file():
        return read_meta(config.load_model_path).n_latent
    return latents_at_stage(config, config.max_latent_stage)


def _reference_engine(config: Config, device: torch.device):
    """The starting model, frozen, for the KL penalty."""
    _, reference = build_training_model(config)
    if config.load_model_path:
        load_weights(reference.base_model, config.load_model_path)
    reference.eval().requires_grad_(False)
    return reference.to(device)


class _Loop:
    """One ``GRPOTrainer.train`` call: rollouts, updates, metrics and checkpoints."""

    def __init__(self, trainer: GRPOTrainer, engine, reference, optimizer, scheduler, components,
                 examples: ExampleSequence, n_latent: int, step: int, checkpoint: Path | None):
        self.trainer, self.config, self.acc = trainer, trainer.config, trainer.accelerator
        self.settings = self.config.rl
        self.engine, self.reference, self.optimizer, self.scheduler = engine, reference, optimizer, scheduler
        self.components, self.examples, self.n_latent = components, examples, n_latent
        self.step, self.checkpoint = step, checkpoint
        self._orders: dict[int, list[int]] = {}
        self.metrics = MetricsLogger(self.acc, self.config.run_dir, jsonl="jsonl" in self.config.log_with,
                                     project=self.config.project, run_name=self.config.name,
                                     config=self.config.to_dict(), start_step=step)

    @property
    def questions_per_batch(self) -> int:
        """Questions of one rollout batch over all processes."""
        return self.settings.questions_per_step * self.acc.num_processes

    def run(self) -> RLResult:
        settings = self.settings
        first = self.step // settings.updates_per_rollout
        started, rollout_seconds, answers = self.step, 0.0, 0
        if first >= settings.steps:
            logger.info("all %d rollout batches are done already (%s)", settings.steps, self.checkpoint)
        bar = tqdm(total=settings.steps, initial=first, desc=f"{self.config.name} (rl)",
                   disable=not self.acc.is_local_main_process, dynamic_ncols=True)
        with bar:
            for rollout_step in range(first, settings.steps):
                began = time.perf_counter()
                rollouts = self._roll_out(rollout_step)
                rolled = time.perf_counter() - began
                batch_answers = sum(len(r.examples) for r in rollouts)
                rollout_seconds, answers = rollout_seconds + rolled, answers + batch_answers
                advantages = [group_advantages(r.reward_values, settings.group_size,
                                               scale=settings.scale_advantages) for r in rollouts]
                for _ in range(settings.updates_per_rollout):
                    stats = self._update(rollouts, advantages)
                record = {"step": self.step, "rollout_step": rollout_step + 1, **self._rollout_stats(rollouts),
                          **stats, "rollout_seconds": rolled, "update_seconds": time.perf_counter() - began - rolled,
                          "rollouts_per_s": batch_answers / rolled}
                self.metrics.log(record)
                bar.update(1)
                bar.set_postfix({"reward": f"{record['reward']:.3f}", "accuracy": f"{record['accuracy']:.2f}",
                                 "kl": f"{record['kl']:.4f}"})
                if self._save_due(rollout_step + 1):
                    self._save()
        return RLResult(self.config.run_dir, self.step - started, self.checkpoint,
                        answers / rollout_seconds if rollout_seconds else 0.0)

    # ------------------------------------------------------------------------------------------------ rollouts
    def _questions(self, rollout_step: int) -> list[int]:
        """This process's question positions in the run's question stream for one rollout batch."""
        per_process = self.settings.questions_per_step
        start = rollout_step * self.questions_per_batch + self.acc.process_index * per_process
        return list(range(start, start + per_process))

    def _example(self, position: int):
        """The question at ``position`` of the stream: pass ``position // n`` over the split, in that pass's order."""
        n = len(self.examples)
        return self.examples[self._pass_order(position // n)[position % n]]

    def _pass_order(self, index: int) -> list[int]:
        """Pass ``index``'s permutation, drawn once: positions only grow, so only the newest pass is kept."""
        if index not in self._orders:
            self._orders = {index: epoch_order(len(self.examples), self.config.seed, index)}
        return self._orders[index]

    @torch.no_grad()
    def _roll_out(self, rollout_step: int) -> list[Rollouts]:
        positions = self._questions(rollout_step)
        per_pass = self.settings.questions_per_pass or len(positions)
        engine = self.acc.unwrap_model(self.engine).eval()
        rollouts = []
        for start in range(0, len(positions), per_pass):
            chunk = positions[start:start + per_pass]
            rollouts.append(roll_out(
                engine, self.components.processor, self.components.tokenizer, [self._example(p) for p in chunk],
                chunk, settings=self.settings, n_latent=self.n_latent, image_size=self.config.image_size,
                seed=self.config.seed, rollout_step=rollout_step,
                token_seed=draw_seed(self.config.seed, rollout_step, chunk[0], 1)))
        return rollouts

    def _rollout_stats(self, rollouts: list[Rollouts]) -> dict[str, float]:
        rewards = [reward for r in rollouts for reward in r.rewards]
        values = torch.tensor([[r.value, r.correct, r.formatted] for r in rewards], dtype=torch.float64,
                              device=self.acc.device)
        lengths = torch.cat([r.lengths.double() for r in rollouts]).to(self.acc.device)
        stds = [std for r in rollouts for sample in r.policy.draws.stds for std in sample]
        entropies = [h for r in rollouts for sample in r.policy.patch_entropies for h in sample]
        local = torch.stack([values[:, 0].sum(), values[:, 1].sum(), values[:, 2].sum(), lengths.sum(),
                             values.new_tensor(float(len(rewards))), values.new_tensor(sum(stds)),
                             values.new_tensor(float(len(stds))), values.new_tensor(sum(entropies)),
                             values.new_tensor(float(len(entropies)))])
        total = self.acc.reduce(local, "sum").tolist()
        n = total[4]
        return {"reward": total[0] / n, "accuracy": total[1] / n, "formatted": total[2] / n,
                "answer_tokens": total[3] / n, "latent_sigma": total[5] / total[6] if total[6] else 0.0,
                "patch_entropy": total[7] / total[8] if total[8] else 0.0}

    # ------------------------------------------------------------------------------------------------ updates
    def _update(self, rollouts: list[Rollouts], advantages: list[torch.Tensor]) -> dict:
        """One optimizer step on every rollout of the batch (one replay forward per pass, gradients summed)."""
        acc, settings = self.acc, self.settings
        # Each kind's loss is its mean over every process's choices: DDP averages the gradients over processes, so
        # each process divides its sum by the global count over the number of processes.
        local = torch.tensor([sum(int(getattr(r.old, mask).sum()) for r in rollouts)
                              for mask in ("token_mask", "latent_mask", "patch_mask")], device=acc.device)
        counts = dict(zip(KINDS, (int(n) for n in acc.reduce(local, "sum"))))
        share = {kind: count / acc.num_processes for kind, count in counts.items()}
        weights = {"text": settings.weight_text, "latent": settings.weight_latent, "patch": settings.weight_patch}
        clips = {"text": settings.clip_text, "latent": settings.clip_latent, "patch": settings.clip_patch}
        totals = {kind: torch.zeros(4, dtype=torch.float64, device=acc.device) for kind in KINDS}
        self.engine.eval()
        for index, (rollout, advantage) in enumerate(zip(rollouts, advantages)):
            last = index == len(rollouts) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.engine):
                new = replay_unit_log_probs(self.engine, rollout.batch, rollout.sequences, rollout.lengths,
                                            rollout.policy, temperature=settings.temperature,
                                            suppress_tokens=rollout.suppressed)
                reference = self._reference_log_probs(rollout) if self.reference is not None else None
                loss = new.tokens.new_zeros(())
                for kind, (values, old, mask) in zip(KINDS, _by_kind(new, rollout.old)):
                    if not counts[kind]:
                        continue
                    part = kind_loss(values, old, mask, advantage.to(values.device), clips[kind],
                                     None if reference is None else reference[kind], settings.dual_clip,
                                     kl_estimator="k2" if kind == "latent" else "k3")
                    loss = loss + (weights[kind] * part.policy_sum + settings.kl * part.kl_sum) / share[kind]
                    totals[kind] += _kind_totals(part, values.device)
                acc.backward(loss.float())
        grad_norm = clip_gradients(acc, self.engine, self.config.max_grad_norm)
        summed = {kind: acc.reduce(totals[kind], "sum").tolist() for kind in KINDS}
        loss = sum(weights[k] * summed[k][0] / summed[k][3] + settings.kl * summed[k][1] / summed[k][3]
                   for k in KINDS if summed[k][3])
        lr = self.scheduler.get_last_lr()[0]
        finite = step_if_finite(self.optimizer, self.scheduler, loss, grad_norm, step=self.step + 1,
                                on_nonfinite=self.config.on_nonfinite, newest=self.checkpoint,
                                advice="Lower lr, rl.sigma or rl.weight_latent")
        self.step += 1
        stats = {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                 "kl": sum(summed[k][1] / summed[k][3] for k in KINDS if summed[k][3])}
        for kind in KINDS:
            if summed[kind][3]:
                stats[f"clip_fraction_{kind}"] = summed[kind][2] / summed[kind][3]
                stats[f"loss_{kind}"] = summed[kind][0] / summed[kind][3]
                if self.reference is not None:
                    stats[f"kl_{kind}"] = summed[kind][1] / summed[kind][3]
        if not finite:
            stats["skipped"] = True
        return stats

    @torch.no_grad()
    def _reference_log_probs(self, rollout: Rollouts) -> dict[str, torch.Tensor]:
        ref = replay_unit_log_probs(self.reference, rollout.batch, rollout.sequences, rollout.lengths,
                                    rollout.policy, temperature=self.settings.temperature,
                                    suppress_tokens=rollout.suppressed)
        return {"text": ref.tokens, "latent": ref.latents, "patch": ref.patches}

    # ------------------------------------------------------------------------------------------------ saving
    def _save_due(self, rollouts_done: int) -> bool:
        if self.config.debug:
            return False
        every = self.config.save_every_steps
        return rollouts_done == self.settings.steps or bool(every and self.step % every == 0)

    def _save(self) -> None:
        refuse_nonfinite_weights(self.acc, self.engine, self.step, self.checkpoint, self.config.lr)
        config, components = self.config, self.components
        engine = self.acc.unwrap_model(self.engine)
        meta = CheckpointMeta(
            base_model=config.model, model_type=components.model_type,
            weights="lora" if config.use_lora else "full", latent_token_id=components.latent_token_id,
            start_latent_id=components.start_latent_id, end_latent_id=components.end_latent_id,
            num_selected_patches=engine.num_selected_patches, n_latent=self.n_latent,
            latents_per_step=config.latents_per_step, positions=config.positions, patch_order=config.patch_order,
            mode=config.mode, image_size=config.image_size, base_seed=config.seed, stage=config.max_latent_stage,
            vision_bottleneck=config.vision_bottleneck, epoch=0, batch=0, step=self.step,
            global_batch_size=self.questions_per_batch * self.settings.group_size)
        self.checkpoint = save_checkpoint(
            self.acc, self.engine, components.processor, meta, self.trainer.checkpoint_root,
            lambda directory: save_training_state(self.acc, self.scheduler, directory), keep_last=config.keep_last)


def _by_kind(new, old):
    """(new, old, mask) per kind of choice, in :data:`KINDS` order."""
    return ((new.tokens, old.tokens, old.token_mask), (new.latents, old.latents, old.latent_mask),
            (new.patches, old.patches, old.patch_mask))


def _kind_totals(part: KindLoss, device) -> torch.Tensor:
    values = [float(part.policy_sum.detach()), float(part.kl_sum.detach()), part.clipped, part.count]
    return torch.tensor(values, dtype=torch.float64, device=device)


def train_rl(config: Config) -> RLResult:
    """Run an RL configuration to its end (or continue it from its newest checkpoint)."""
    return GRPOTrainer(config.check_values()).train()
