"""Curriculum rules of docs/design.md, checked on exact expected values."""

from __future__ import annotations

import numpy as np
import pytest

from ivtlr.data import (Curriculum, CurriculumDataset, Example, TrainingItem, format_prompt_text, latent_plan,
                        split_rationale, stage_for_epoch, target_text)


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("", []),
        ("No full stop at all", ["No full stop at all"]),
        ("One. Two. Three.", ["One", "Two", "Three."]),
        ("One. Two. Three. ", ["One", "Two", "Three"]),
        ("One.\nTwo", ["One", "Two"]),
        ("One. . Two", ["One", "", "Two"]),
        ("a. b. c. d", ["a. b", "c", "d"]),
        ("a. b. c. d. e", ["a. b", "c. d", "e"]),
        ("a. b. c. d. e. f", ["a. b", "c. d", "e. f"]),
        ("s1. s2. s3. s4. s5. s6. s7", ["s1. s2. s3", "s4. s5", "s6. s7"]),
        ("s1. s2. s3. s4. s5. s6. s7. ", ["s1. s2. s3", "s4. s5", "s6. s7"]),
        ("s1\ns2. s3. s4. s5.\n", ["s1 s2. s3", "s4", "s5"]),
    ],
)
def test_split_rationale_exact(text, steps):
    assert split_rationale(text) == steps


@pytest.mark.parametrize("n_sentences", range(1, 14))
def test_split_rationale_chunk_sizes_match_array_split(n_sentences):
    sentences = [f"s{index}" for index in range(n_sentences)]
    steps = split_rationale(". ".join(sentences) + ".")
    sentences[-1] += "."
    expected = [". ".join(chunk) for chunk in np.array_split(np.array(sentences, dtype=object), min(n_sentences, 3))]
    assert steps == expected


def test_format_prompt_text_exact():
    assert format_prompt_text("Which digit?", ["zero", "one", "two"]) == (
        "[Question]:Which digit?\n[Options]:\n(A).zero\n(B).one\n(C).two\nAnswer:\n"
    )


def test_target_text_exact():
    assert target_text(["Step one", "Step two."], "C") == "Step one\nStep two.\nTherefore, the answer is C"
    assert target_text([], "A") == "Therefore, the answer is A"


def test_stage_for_epoch_matches_the_original_run():
    assert [stage_for_epoch(epoch, 4) for epoch in range(16)] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    with pytest.raises(ValueError, match="epochs_per_stage"):
        stage_for_epoch(3, 0)
    with pytest.raises(ValueError, match="epoch must be non-negative"):
        stage_for_epoch(-1, 4)


@pytest.mark.parametrize(
    ("n_steps", "stage", "max_latent_stage", "pad", "latents_per_step", "expected"),
    [
        (3, 0, 3, False, 1, (0, 0)),
        (3, 1, 3, False, 1, (1, 1)),
        (3, 3, 3, False, 1, (3, 3)),
        (1, 2, 3, False, 1, (2, 1)),  # exactly s latents even with fewer steps
        (0, 1, 3, False, 1, (1, 0)),
        (2, 4, 3, False, 1, (2, 2)),  # above max: one per step
        (2, 4, 3, True, 1, (3, 2)),  # above max, padded to max
        (5, 4, 3, False, 1, (3, 5)),  # above max: at most max latents
        (3, 2, 3, False, 2, (4, 2)),  # c_thought multiplies the slots, not the removed steps
        (1, 5, 3, True, 2, (6, 1)),
        (0, 0, 3, False, 2, (0, 0)),
    ],
)
def test_latent_plan_exact(n_steps, stage, max_latent_stage, pad, latents_per_step, expected):
    assert latent_plan(n_steps, stage, max_latent_stage, pad, latents_per_step=latents_per_step) == expected


@pytest.mark.parametrize("stage", [0, 2, 7])
def test_baseline_modes_ignore_the_stage(stage):
    assert latent_plan(3, stage, 3, mode="cot") == (0, 0)
    assert latent_plan(3, stage, 3, mode="nocot") == (0, 3)


@pytest.mark.parametrize("mode", ["latent_text_only", "latent_vision_only"])
def test_ablation_modes_follow_the_ivtlr_schedule(mode):
    for stage in range(6):
        assert latent_plan(2, stage, 3, True, mode=mode) == latent_plan(2, stage, 3, True)


def test_latent_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown mode"):
        latent_plan(3, 1, 3, mode="coconut")
    with pytest.raises(ValueError, match="latents_per_step"):
        latent_plan(3, 1, 3, latents_per_step=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        latent_plan(-1, 1, 3)


EXAMPLE = Example(
    id="q1",
    image=None,
    question="Which digit?",
    choices=["zero", "one"],
    answer="B",
    rationale="It has one stroke. It is straight. It is not a loop. Nothing else is drawn.",
    metadata={},
)
PROMPT = "[Question]:Which digit?\n[Options]:\n(A).zero\n(B).one\nAnswer:\n"


@pytest.mark.parametrize(
    ("mode", "stage", "n_latent", "target"),
    [
        ("ivtlr", 0, 0, "It has one stroke. It is straight\nIt is not a loop\nNothing else is drawn.\n"),
        ("ivtlr", 1, 1, "It is not a loop\nNothing else is drawn.\n"),
        ("ivtlr", 2, 2, "Nothing else is drawn.\n"),
        ("ivtlr", 3, 3, ""),
        ("ivtlr", 9, 3, ""),
        ("cot", 2, 0, "It has one stroke. It is straight\nIt is not a loop\nNothing else is drawn.\n"),
        ("nocot", 2, 0, ""),
    ],
)
def test_curriculum_item_exact(mode, stage, n_latent, target):
    curriculum = Curriculum(max_latent_stage=3, mode=mode)
    item = curriculum.item(EXAMPLE, stage)
    steps = ["It has one stroke. It is straight", "It is not a loop", "Nothing else is drawn."]
    assert item == TrainingItem(
        id="q1", image=None, prompt=PROMPT, n_latent=n_latent, target=target + "Therefore, the answer is B",
        latent_steps=tuple(steps[t] if t < len(steps) else None for t in range(n_latent)),
        latent_boxes=(None,) * n_latent,
    )


def test_curriculum_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown mode 'coconut'"):
        Curriculum(mode="coconut")
    with pytest.raises(ValueError, match="invalid curriculum settings"):
        Curriculum(epochs_per_stage=0)


def test_curriculum_dataset_follows_the_epoch():
    dataset = CurriculumDataset([EXAMPLE, EXAMPLE], Curriculum(epochs_per_stage=2, max_latent_stage=3))
    assert len(dataset) == 2
    assert [item.n_latent for item in dataset] == [0, 0]
    dataset.set_epoch(5)
    assert dataset.stage == 2
    assert dataset[1].n_latent == 2
