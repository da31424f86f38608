"""The stochastic latent policy (``ivtlr.method.policy``) against independent computations: closed forms, every
ordering enumerated, the deterministic chain, a teacher-forced replay, and finite differences."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ivtlr.method.policy import (LatentPolicy, gaussian_log_prob, gumbel_top_k, plackett_luce_log_prob,
                                 replay_log_probs, rollout_log_probs)
from ivtlr.testing import build_tiny
from test_generation import MIXED, engine_for, prompt_batch, unpadded


def test_the_gaussian_log_prob_is_the_closed_form():
    torch.manual_seed(0)
    mean, z = torch.randn(2, 16), torch.randn(2, 16)
    expected = torch.distributions.Normal(mean, 0.7).log_prob(z).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(z, mean, 0.7).float(), expected)


def sequential_probability(logits: list[float], order: tuple[int, ...], available: list[bool]) -> float:
    """The draw-by-draw probability, written out with Python floats."""
    remaining, probability = list(available), 1.0
    for index in order:
        weights = [math.exp(x) if ok else 0.0 for x, ok in zip(logits, remaining)]
        probability *= weights[index] / sum(weights)
        remaining[index] = False
    return probability


def test_plackett_luce_equals_every_ordering_enumerated():
    scores = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.9])
    available = torch.tensor([True, True, True, False, True])
    tau, k = 0.7, 3
    total = 0.0
    for order in itertools.permutations([i for i in range(5) if available[i]], k):
        got = plackett_luce_log_prob(scores, torch.tensor(order), available, tau).exp().item()
        assert got == pytest.approx(sequential_probability((scores / tau).tolist(), order, available.tolist()),
                                    rel=1e-6)
        total += got
    assert total == pytest.approx(1.0, abs=1e-6)


def test_gumbel_top_k_draws_with_the_plackett_luce_probabilities():
    scores, available = torch.tensor([1.0, 0.0, -0.5, 0.5]), torch.ones(4, dtype=torch.bool)
    generator, counts, draws = torch.Generator().manual_seed(0), {}, 20000
    for _ in range(draws):
        order = tuple(gumbel_top_k(scores, available, 2, 1.0, generator).tolist())
        counts[order] = counts.get(order, 0) + 1
    for order, count in counts.items():
        expected = plackett_luce_log_prob(scores, torch.tensor(order), available, 1.0).exp().item()
        assert count / draws == pytest.approx(expected, abs=0.012), order


def test_the_policy_gradient_of_a_one_step_problem_matches_finite_differences():
    """d/dtheta E[R(order)] = E[R(order) d log P(order)/dtheta], the expectation taken over every ordering."""
    reward = {order: float(sum((i + 1) * j for i, j in enumerate(order)))
              for order in itertools.permutations(range(4), 2)}
    available = torch.ones(4, dtype=torch.bool)

    def expected_reward(theta: torch.Tensor) -> torch.Tensor:
        return sum(plackett_luce_log_prob(theta, torch.tensor(o), available, 0.8).exp() * r for o, r in reward.items())

    theta = torch.tensor([0.2, -0.4, 0.9, 0.1], requires_grad=True)
    score_function = sum(plackett_luce_log_prob(theta, torch.tensor(o), available, 0.8).exp().detach() * r *
                         plackett_luce_log_prob(theta, torch.tensor(o), available, 0.8) for o, r in reward.items())
    (gradient,) = torch.autograd.grad(score_function, theta)
    epsilon = 1e-3
    finite = torch.stack([(expected_reward(theta.detach() + epsilon * e) -
                           expected_reward(theta.detach() - epsilon * e)) / (2 * epsilon) for e in torch.eye(4)])
    torch.testing.assert_close(gradient.float(), finite.float(), rtol=1e-3, atol=1e-4)


def test_the_gaussian_policy_gradient_matches_the_closed_form():
    """R(z) = -|z - c|^2 has E[R] = -|mu - c|^2 - d s^2: its gradient is -2 (mu - c)."""
    torch.manual_seed(0)
    mu, c, s = torch.tensor([0.5, -1.0], requires_grad=True), torch.tensor([1.5, 0.0]), 0.3
    z = mu.detach() + s * torch.randn(200_000, 2)
    reward = -((z - c) ** 2).sum(-1)
    surrogate = ((reward - reward.mean()) * gaussian_log_prob(z, mu.expand_as(z), s)).mean()
    (gradient,) = torch.autograd.grad(surrogate, mu)
    torch.testing.assert_close(gradient.float(), -2 * (mu.detach() - c), rtol=0.03, atol=0.03)


@pytest.fixture(scope="module")
def bundle():
    return build_tiny("qwen2_vl")


def test_zero_noise_and_zero_temperature_are_the_deterministic_chain(bundle):
    engine = engine_for(bundle).eval()
    batch = prompt_batch(bundle, MIXED)
    plain = engine.generate(**batch, max_new_tokens=6, return_dict=True)
    policy = LatentPolicy(sigma=0.0, tau=0.0, seeds=list(range(len(MIXED))))
    drawn = engine.generate(**batch, max_new_tokens=6, return_dict=True, intervention=policy)
    assert [unpadded(drawn, b) for b in range(len(MIXED))] == [unpadded(plain, b) for b in range(len(MIXED))]
    assert [[s.tolist() for s in steps] for steps in drawn.selected] == \
        [[s.tolist() for s in steps] for steps in plain.selected]
    for b in range(len(MIXED)):
        torch.testing.assert_close(drawn.latents[b], plain.latents[b], rtol=0, atol=0)


def rollout(engine, bundle, specs, seeds, temperature=1.3):
    batch = prompt_batch(bundle, specs)
    policy = LatentPolicy(sigma=0.5, tau=0.5, seeds=seeds)
    out = engine.generate(**batch, max_new_tokens=6, return_dict=True, intervention=policy, do_sample=True,
                          temperature=temperature, generator=torch.Generator().manual_seed(7), return_log_probs=True)
    return batch, out, policy


@pytest.mark.parametrize("specs", [MIXED, MIXED[1:2]], ids=["batched", "alone"])
def test_a_replay_at_the_same_weights_has_ratio_one(bundle, specs):
    engine = engine_for(bundle).eval()
    batch, out, policy = rollout(engine, bundle, specs, seeds=[11, 12, 13, 14][:len(specs)])
    recorded = rollout_log_probs(policy, out.token_log_probs)
    assert recorded.latents.abs().sum() > 0 and recorded.patches.abs().sum() > 0  # the draws were stochastic
    replayed = replay_log_probs(engine, batch, out.sequences, out.lengths, policy, temperature=1.3)
    for kind in ("tokens", "latents", "patches"):
        ratio = (getattr(replayed, kind) - getattr(recorded, kind)).exp()
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_a_replayed_sample_has_the_log_probs_it_has_alone(bundle):
    engine = engine_for(bundle).eval()
    batch, out, policy = rollout(engine, bundle, MIXED, seeds=[11, 12, 13, 14])
    replayed = replay_log_probs(engine, batch, out.sequences, out.lengths, policy, temperature=1.3)
    for b, spec in enumerate(MIXED):  # each sample alone, its own draws replayed
        single = LatentPolicy(sigma=0.5, tau=0.5, seeds=[11 + b])
        single.draws.rows, single.draws.orders = [policy.draws.rows[b]], [policy.draws.orders[b]]
        single.draws.stds = [policy.draws.stds[b]]
        alone = replay_log_probs(engine, prompt_batch(bundle, [spec]), out.sequences[b:b + 1],
                                 out.lengths[b:b + 1], single, temperature=1.3)
        torch.testing.assert_close(alone.total, replayed.total[b:b + 1], rtol=1e-6, atol=0)


def test_a_sample_draws_the_same_latents_whatever_its_batch(bundle):
    engine = engine_for(bundle).eval()
    _, together, policy = rollout(engine, bundle, MIXED, seeds=[21, 22, 23, 24])
    _, alone, single = rollout(engine, bundle, MIXED[1:2], seeds=[22])
    assert [s.tolist() for s in together.selected[1]] == [s.tolist() for s in alone.selected[0]]
    torch.testing.assert_close(torch.stack(policy.draws.rows[1]), torch.stack(single.draws.rows[0]), rtol=0,
                               atol=1e-5)


def test_the_replayed_log_probs_train_the_passes_that_produced_them(bundle):
    """In detach mode the fed row carries no gradient, yet the latent and patch log-probabilities reach the weights
    of the passes that computed the state and the attention scores."""
    engine = engine_for(bundle).eval()
    batch, out, policy = rollout(engine, bundle, MIXED[:1], seeds=[5])
    replayed = replay_log_probs(engine, batch, out.sequences, out.lengths, policy, temperature=1.3)
    engine.zero_grad()
    (replayed.latents.sum() + replayed.patches.sum()).backward()
    query = engine.backbone.decoder().layers[0].self_attn.q_proj.weight
    assert query.grad is not None and query.grad.abs().sum() > 0
