"""Continuous batching (``IVTLR.live_batch``): requests that join and leave between passes are answered as
``generate`` answers each alone — same tokens, same patches — whatever is in flight, for every family."""
from __future__ import annotations

import pytest
import torch

from engine_inputs import SampleSpec
from ivtlr.method.live import vision_of
from ivtlr.testing import FAMILIES, TinyBundle, build_tiny
from test_generation import MIXED, engine_for, prompt_batch, unpadded

MAX_NEW = 6
#: (tick at which each question arrives, question): arrivals while others are in their prompt, latent or answer phase
ARRIVALS = [(0, MIXED[0]), (0, MIXED[2]), (1, MIXED[1]), (3, MIXED[3]), (4, MIXED[0]),
            (9, SampleSpec("Is there a digit?", 2, image_size=(84, 84), seed=7))]


@pytest.fixture(scope="module", params=FAMILIES)
def bundle(request) -> TinyBundle:
    return build_tiny(request.param)


def answered_alone(engine, bundle: TinyBundle, spec: SampleSpec, **options) -> tuple[list[int], list[list[int]]]:
    out = engine.generate(**prompt_batch(bundle, [spec]), max_new_tokens=MAX_NEW, return_dict=True, **options)
    return unpadded(out, 0), [s.tolist() for s in out.selected[0]]


def run_live(engine, bundle: TinyBundle, arrivals, **options) -> tuple[list, int]:
    """Feed the questions at their ticks; returns each request (in arrival order) and the widest batch seen."""
    live, requests, tick, widest = engine.live_batch(), [], 0, 0
    pending = list(arrivals)
    while pending or len(live):
        while pending and pending[0][0] <= tick:
            batch = prompt_batch(bundle, [pending.pop(0)[1]])
            requests.append(live.admit(batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW,
                                       **options, **vision_of(batch)))
        widest = max(widest, len(live))
        live.tick()
        tick += 1
    return requests, widest


def test_interleaved_arrivals_are_answered_as_alone(bundle):
    engine = engine_for(bundle)
    requests, widest = run_live(engine, bundle, ARRIVALS)
    assert widest >= 3  # questions really were in flight together
    for request, (_, spec) in zip(requests, ARRIVALS):
        tokens, patches = answered_alone(engine, bundle, spec)
        assert request.tokens == tokens
        assert [s.tolist() for s in request.selected] == patches
        assert len(request.selected) == spec.n_latent


def test_the_vision_bottleneck_holds_for_requests_that_join_late(bundle):
    engine = engine_for(bundle, vision_bottleneck=True)
    requests, _ = run_live(engine, bundle, ARRIVALS[:4])
    for request, (_, spec) in zip(requests, ARRIVALS[:4]):
        assert request.tokens == answered_alone(engine, bundle, spec)[0]


def test_sampled_answers_follow_their_own_generator(bundle):
    engine = engine_for(bundle)
    options = {"do_sample": True, "temperature": 1.5}
    live = engine.live_batch()
    requests = []
    for seed, (_, spec) in enumerate(ARRIVALS[:3]):
        batch = prompt_batch(bundle, [spec])
        requests.append(live.admit(batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW,
                                   generator=torch.Generator().manual_seed(seed), **options, **vision_of(batch)))
    while len(live):
        live.tick()
    for seed, (request, (_, spec)) in enumerate(zip(requests, ARRIVALS[:3])):
        alone = answered_alone(engine, bundle, spec, generator=torch.Generator().manual_seed(seed), **options)[0]
        assert request.tokens == alone


def test_a_cancelled_request_leaves_and_frees_its_row(bundle):
    engine = engine_for(bundle)
    live = engine.live_batch()
    batches = [prompt_batch(bundle, [spec]) for _, spec in ARRIVALS[:2]]
    first, second = (live.admit(b["input_ids"], b["attention_mask"], max_new_tokens=MAX_NEW, **vision_of(b))
                     for b in batches)
    live.tick()
    live.cancel(first)
    live.tick()
    assert live.active == [second] and live.runner.key_mask.shape[0] == 1
    while len(live):
        live.tick()
    assert second.tokens == answered_alone(engine, bundle, ARRIVALS[1][1])[0]
    assert live.runner is None  # everything left: the cache is gone


def test_a_question_joining_as_every_request_in_flight_is_cancelled_is_answered(bundle):
    """The tick after every active request was cancelled has no row to compute for them; a question joining in that
    tick must still get its prompt pass and its answer (the server's clients that left mid-stream, then a burst)."""
    engine = engine_for(bundle)
    live = engine.live_batch()
    first_batch, later_batch = (prompt_batch(bundle, [spec]) for _, spec in ARRIVALS[:2])
    first = live.admit(first_batch["input_ids"], first_batch["attention_mask"], max_new_tokens=MAX_NEW,
                       **vision_of(first_batch))
    live.tick()
    live.cancel(first)
    later = live.admit(later_batch["input_ids"], later_batch["attention_mask"], max_new_tokens=MAX_NEW,
                       **vision_of(later_batch))
    while len(live):
        live.tick()
    assert later.tokens == answered_alone(engine, bundle, ARRIVALS[1][1])[0]
