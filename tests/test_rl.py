"""``ivtlr rl``: GRPO on latent chains. The objective against hand computations and sampled expectations; rollouts
replayed at the same weights; runs through the command: metrics and a checkpoint the evaluation reads, a killed run
resumed bit-identical, two DDP processes equal to one."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from schema_files import write_m3cot_files
from train_runs import (accelerate_command, checkpoint_weights, column, final_weights, max_difference, metrics,
                        one_thread, run_subprocess, single_thread, subprocess_env, train_exit_status, train_in_process,
                        write_config)

from ivtlr.checkpoint import checkpoint_dirs, latest_checkpoint, read_meta
from ivtlr.config import RLConfig
from ivtlr.data import load_examples
from ivtlr.loading import load
from ivtlr.method.policy import replay_unit_log_probs
from ivtlr.rl.objective import group_advantages, kind_loss
from ivtlr.rl.rollouts import roll_out

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

#: Small rollouts whose rewards differ within a group: an untrained model's sampled words name an option now and then
#: under the M3CoT rule, and the format reward pays for that.
RL = {"steps": 3, "questions_per_step": 2, "group_size": 3, "max_new_tokens": 6, "sigma": 0.5, "tau": 0.5,
      "n_latent": 2, "reward_format": 0.5, "answer_rule": "m3cot", "temperature": 2.0}


# ---------------------------------------------------------------------------------------------------- the objective
def test_advantages_are_each_groups_standard_scores():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])
    got = group_advantages(rewards, 4)
    for group in range(3):
        values = rewards[4 * group:4 * group + 4].tolist()
        mean, std = statistics.mean(values), statistics.stdev(values)
        expected = [(v - mean) / (std + 1e-4) for v in values]
        assert got[4 * group:4 * group + 4].tolist() == pytest.approx(expected)
    assert group_advantages(rewards, 4, scale=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


def test_the_clipped_loss_follows_the_policy_gradient_inside_the_clip_and_stops_outside():
    """Per choice, d loss / d log pi = -A r where the unclipped term is the one kept, else 0 (PPO's clip at 0.2, and
    the dual clip at 3 for a negative advantage)."""
    ratios = torch.tensor([[1.0, 1.5, 0.5, 1.5, 5.0, 0.5]], dtype=torch.float64)
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.zeros(6, 1, dtype=torch.float64)
    new = ratios.T.log().clone().requires_grad_(True)
    part = kind_loss(new, old, torch.ones(6, 1, dtype=torch.bool), advantages, clip=0.2, dual_clip=3.0)
    (gradient,) = torch.autograd.grad(part.policy_sum, new)
    kept = torch.tensor([True, False, True, True, False, False])
    expected = torch.where(kept, -advantages * ratios[0], torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(gradient[:, 0], expected)
    assert part.clipped == 3 and part.count == 6
    objective = [1.0, 1.2, 0.5, -1.5, -3.0, -0.8]  # min(rA, clip(r)A), bounded below by 3A where A < 0
    assert float(part.policy_sum.detach()) == pytest.approx(-sum(objective))


def test_the_k3_estimate_averages_to_the_exact_kl():
    new_logits, ref_logits = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([0.0, 0.3, 1.0, -0.5])
    new_log_p, ref_log_p = new_logits.log_softmax(0).double(), ref_logits.log_softmax(0).double()
    exact = float((new_log_p.exp() * (new_log_p - ref_log_p)).sum())
    draws = torch.multinomial(new_log_p.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    new, ref = new_log_p[draws][:, None], ref_log_p[draws][:, None]
    mask = torch.ones_like(new, dtype=torch.bool)
    advantages = torch.zeros(len(draws), dtype=torch.float64)
    k3 = kind_loss(new, new, mask, advantages, clip=0.2, reference=ref).kl_sum / len(draws)
    assert float(k3) == pytest.approx(exact, rel=0.02)
    k2 = kind_loss(new, new, mask, advantages, clip=0.2, reference=ref, kl_estimator="k2").kl_sum / len(draws)
    assert float(k2) == pytest.approx(float((0.5 * (ref - new) ** 2).mean()))


# ---------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """Data and a trained tiny checkpoint to start RL from."""
    tmp = tmp_path_factory.mktemp("sft")
    files = write_m3cot_files(tmp / "data", n_train=4, n_test=2)
    with one_thread():
        run = train_in_process(write_config(tmp, files, name="sft"))
    return tmp, files, latest_checkpoint(run / "checkpoints")


@pytest.fixture(scope="module")
def sft_lora(tmp_path_factory):
    """The same with a LoRA adapter."""
    tmp = tmp_path_factory.mktemp("sft_lora")
    files = write_m3cot_files(tmp / "data", n_train=4, n_test=2)
    with one_thread():
        run = train_in_process(write_config(tmp, files, name="sft", use_lora=True))
    return tmp, files, latest_checkpoint(run / "checkpoints")


def rl_config(sft, directory: Path, name: str, **settings) -> Path:
    _, files, checkpoint = sft
    keys = {key: settings.pop(key) for key in list(settings) if key in ("save_every_steps", "use_lora", "resume")}
    return write_config(directory, files, name=name, load_model_path=str(checkpoint), rl={**RL, **settings}, **keys)


def rl_exit_status(config: Path, *overrides: str) -> int:
    return train_exit_status(config, *overrides, command="rl")


def test_rollouts_replayed_at_the_same_weights_have_ratio_one(sft):
    _, files, checkpoint = sft
    model = load(checkpoint, device="cpu")
    questions = list(load_examples("m3cot", "train", data_files={k: str(v) for k, v in files.items()}))[:2]
    settings = RLConfig(**{**RL, "group_size": 3})
    rollouts = roll_out(model.engine, model.processor, model.tokenizer, questions, [0, 1], settings=settings,
                        n_latent=2, image_size=56, seed=0, rollout_step=0, token_seed=1)
    assert [e.id for e in rollouts.examples] == [questions[0].id] * 3 + [questions[1].id] * 3
    generated = rollouts.sequences[torch.arange(rollouts.sequences.shape[1]) < rollouts.lengths[:, None]]
    # At temperature 2 an untrained model would write image placeholders and latent slots; no answer may.
    assert model.engine.latent_token_id in rollouts.suppressed and model.engine.eos_token_ids.isdisjoint(
        rollouts.suppressed)
    assert not torch.isin(generated, torch.tensor(rollouts.suppressed)).any()
    rows = torch.stack([torch.stack(sample) for sample in rollouts.policy.draws.rows])
    assert not torch.equal(rows[0], rows[1])  # each rollout of a question draws its own latents
    replayed = replay_unit_log_probs(model.engine, rollouts.batch, rollouts.sequences, rollouts.lengths,
                                     rollouts.policy, temperature=settings.temperature,
                                     suppress_tokens=rollouts.suppressed)
    old = rollouts.old
    assert old.latent_mask.sum() == 6 * 2 and old.patch_mask.sum() == 6 * 2
    for new, recorded, mask in ((replayed.tokens, old.tokens, old.token_mask),
                                (replayed.latents, old.latents, old.latent_mask),
                                (replayed.patches, old.patches, old.patch_mask)):
        ratio = (new - recorded).exp()[mask]
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_an_rl_run_logs_its_metrics_and_leaves_a_checkpoint_evaluation_reads(sft, tmp_path):
    config = rl_config(sft, tmp_path, "rl", steps=2, kl=0.1)
    assert rl_exit_status(config) == 0
    run_dir = tmp_path / "runs" / "rl"
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2] and [r["rollout_step"] for r in records] == [1, 2]
    for key in ("reward", "accuracy", "formatted", "kl", "kl_latent", "clip_fraction_text", "clip_fraction_latent",
                "clip_fraction_patch", "latent_sigma", "patch_entropy", "rollouts_per_s", "grad_norm"):
        assert all(key in r for r in records), key
    assert records[0]["clip_fraction_text"] == 0  # one update per rollout batch: on-policy, every ratio is 1
    assert 0 < records[0]["patch_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-9  # 4 image tokens
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    meta = read_meta(checkpoint)
    assert (meta.step, meta.n_latent) == (2, 2)
    assert max_difference(checkpoint_weights(checkpoint), checkpoint_weights(sft[2])) > 0  # the weights moved
    model = load(checkpoint, device="cpu")
    assert model.n_latent(None) == 2


def test_rl_trains_a_lora_adapter_from_a_lora_checkpoint(sft_lora, tmp_path):
    assert rl_exit_status(rl_config(sft_lora, tmp_path, "rl", steps=1, use_lora=True)) == 0
    checkpoint = latest_checkpoint(tmp_path / "runs" / "rl" / "checkpoints")
    assert read_meta(checkpoint).weights == "lora"
    moved = {name for name, value in checkpoint_weights(checkpoint).items()
             if not torch.equal(value, checkpoint_weights(sft_lora[2])[name])}
    assert moved and all("lora_" in name or "trainable_tokens" in name or "embed" in name for name in moved)


def test_trainings_gradient_accumulation_key_does_not_scale_an_rl_step(sft, tmp_path):
    """A rollout batch is one optimizer step whatever gradient_accumulation_steps says (Accelerate would otherwise
    divide the loss by it)."""
    for name, accumulation in (("one", 1), ("four", 4)):
        config = rl_config(sft, tmp_path, name, steps=1)
        assert rl_exit_status(config, f"gradient_accumulation_steps={accumulation}") == 0
    one, four = final_weights(tmp_path / "runs" / "one"), final_weights(tmp_path / "runs" / "four")
    assert column(tmp_path / "runs" / "one", "grad_norm") == column(tmp_path / "runs" / "four", "grad_norm")
    assert all(torch.equal(one[name], four[name]) for name in one)


def test_a_killed_rl_run_resumes_bit_identical(sft, tmp_path, caplog):
    reference_config = rl_config(sft, tmp_path, "reference", steps=4, save_every_steps=1)
    assert rl_exit_status(reference_config) == 0
    # A supervised run's resume key, copied along, must not stop RL from continuing its own newest checkpoint.
    config = rl_config(sft, tmp_path, "interrupted", steps=4, save_every_steps=1, resume=3)
    run_dir = tmp_path / "runs" / "interrupted"
    command = [sys.executable, "-m", "ivtlr", "rl", str(config)]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not checkpoint_dirs(run_dir / "checkpoints") and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -9, f"the run ended before it could be killed: {stderr.decode()[-3000:]}"
    stopped_at = read_meta(checkpoint_dirs(run_dir / "checkpoints")[-1]).step
    assert stopped_at < 4
    with caplog.at_level("INFO"):
        assert rl_exit_status(config) == 0  # the same command again
    assert f"{stopped_at} optimizer steps done" in caplog.text and "resume=3 ignored" in caplog.text
    reference = final_weights(tmp_path / "runs" / "reference")
    resumed = final_weights(run_dir)
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)  # bit-identical
    assert column(run_dir, "step") == [1, 2, 3, 4]
    assert column(run_dir, "reward") == column(tmp_path / "runs" / "reference", "reward")


def test_two_ddp_processes_train_as_one_with_the_same_questions(sft, tmp_path):
    """One process answering 2 questions per batch in passes of 1 draws what two processes answering 1 each draw;
    the loss is the mean over both processes' choices, so the weights agree."""
    single = rl_config(sft, tmp_path, "single", steps=2, questions_per_step=2, questions_per_pass=1)
    assert rl_exit_status(single) == 0
    command = accelerate_command("cpu_ddp.yaml", single, "name=ddp", "rl.questions_per_step=1")
    command[command.index("train")] = "rl"
    run_subprocess(command)
    ddp, one = tmp_path / "runs" / "ddp", tmp_path / "runs" / "single"
    assert column(ddp, "reward") == column(one, "reward")
    assert column(ddp, "loss") == pytest.approx(column(one, "loss"), rel=1e-4)
    assert max_difference(final_weights(ddp), final_weights(one)) < 1e-5


@pytest.mark.parametrize("override, message", [
    ("rl.group_size=1", "rl.group_size must be >= 2"),
    ("rl.temperature=0", "rl.temperature must be > 0"),
    ("rl.dual_clip=0.5", "rl.dual_clip must be > 1"),
    ("rl.sigma=-1", "rl.sigma must be >= 0"),
])
def test_bad_rl_settings_are_refused_with_the_key_named(sft, tmp_path, capsys, override, message):
    assert rl_exit_status(rl_config(sft, tmp_path, "bad"), override) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / "bad").exists()
