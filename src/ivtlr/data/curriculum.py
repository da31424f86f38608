"""Rationale steps, the prompt and target texts, and the progressive schedule that swaps steps for latents.

Stage 0 trains on the full written rationale; at stage s the first s steps are replaced by s latent
slots; past `max_latent_stage` every step is gone. The "cot" and "nocot" modes are the baselines the
evaluation compares against: always the full rationale, or never any rationale nor latent. The ablation
modes "latent_text_only" / "latent_vision_only" follow the IVT-LR schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ivtlr.modes import Mode, mode_spec
from ivtlr.data.example import Box, Example, option_letter

# The two ablations change only what the engine puts in a latent step; their data is IVT-LR's.
MAX_STEPS = 3


def split_rationale(text: str) -> list[str]:
    """Reasoning steps of a rationale: sentences (split on ". "), merged into at most 3 contiguous chunks.

    With n > 3 sentences the chunks hold near-equal counts, the earlier chunks taking the remainder
    (7 sentences -> 3, 2, 2), and the sentences inside a chunk are re-joined with ". ".
    """
    pieces = text.replace("\n", " ").split(". ")
    if pieces[-1] == "":
        pieces.pop()
    if len(pieces) <= MAX_STEPS:
        return pieces
    base, remainder = divmod(len(pieces), MAX_STEPS)
    steps, start = [], 0
    for chunk in range(MAX_STEPS):
        size = base + (1 if chunk < remainder else 0)
        steps.append(". ".join(pieces[start : start + size]))
        start += size
    return steps


def format_prompt_text(question: str, choices: list[str]) -> str:
    """The question and lettered options; the same text is used for training and evaluation."""
    options = "".join(f"({option_letter(index)}).{choice}\n" for index, choice in enumerate(choices))
    return f"[Question]:{question}\n[Options]:\n{options}Answer:\n"


def answer_line(answer_letter: str) -> str:
    """The sentence the scorer looks for; it ends every target."""
    return f"Therefore, the answer is {answer_letter}"


def target_text(remaining_steps: list[str], answer_letter: str) -> str:
    """The explicit text after the latents: each remaining step on its own line, then the answer line."""
    return "".join(f"{step}\n" for step in remaining_steps) + answer_line(answer_letter)


def stage_for_epoch(epoch: int, epochs_per_stage: int) -> int:
    if epochs_per_stage < 1:
        raise ValueError(f"epochs_per_stage must be at least 1, got {epochs_per_stage}")
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    return epoch // epochs_per_stage


def latent_plan(
    n_steps: int,
    stage: int,
    max_latent_stage: int,
    pad_latent_to_max: bool = False,
    *,
    latents_per_step: int = 1,
    mode: Mode = "ivtlr",
) -> tuple[int, int]:
    """(number of latent slots, number of leading steps removed) for a sample with `n_steps` steps.

    Up to `max_latent_stage` a stage-s sample gets exactly s latent steps whatever its step count (only
    the steps that exist can be removed); beyond it every step is removed and the sample gets
    `max_latent_stage` latent steps if `pad_latent_to_max`, else one per step (at most `max_latent_stage`).
    Each latent step is `latents_per_step` slots (Coconut's c_thought).
    """
    curriculum = mode_spec(mode).curriculum
    if min(n_steps, stage, max_latent_stage) < 0 or latents_per_step < 1:
        raise ValueError("n_steps, stage and max_latent_stage must be >= 0 and latents_per_step >= 1")
    if curriculum == "written":
        return 0, 0
    if curriculum == "answer":
        return 0, n_steps
    if stage <= max_latent_stage:
        latent_steps, removed = stage, min(stage, n_steps)
    else:
        latent_steps = max_latent_stage if pad_latent_to_max else min(n_steps, max_latent_stage)
        removed = n_steps
    return latent_steps * latents_per_step, removed


@dataclass(frozen=True)
class TrainingItem:
    """One sample as the collator needs it: the prompt, how many latent slots follow, and the text to learn."""

    id: str
    image: Image.Image | None
    prompt: str
    n_latent: int
    target: str
    #: per latent slot, the written step it replaced (None: it replaced none), for step supervision
    latent_steps: tuple[str | None, ...] = ()
    #: per latent slot, the region (pixels) its step reads (None: none known), for region supervision
    latent_boxes: tuple[Box | None, ...] = ()


@dataclass(frozen=True)
class Curriculum:
    """The schedule's settings, turning an example and a stage into a `TrainingItem`."""

    epochs_per_stage: int = 4
    max_latent_stage: int = 5
    pad_latent_to_max: bool = False
    latents_per_step: int = 1
    mode: Mode = "ivtlr"

    def __post_init__(self) -> None:
        mode_spec(self.mode)  # an unknown mode is an error naming the known ones
        if self.epochs_per_stage < 1 or self.max_latent_stage < 0 or self.latents_per_step < 1:
            raise ValueError(f"invalid curriculum settings: {self}")

    def stage(self, epoch: int) -> int:
        return stage_for_epoch(epoch, self.epochs_per_stage)

    def item(self, example: Example, stage: int) -> TrainingItem:
        steps = split_rationale(example.rationale)
        n_latent, removed = latent_plan(
            len(steps),
            stage,
            self.max_latent_stage,
            self.pad_latent_to_max,
            latents_per_step=self.latents_per_step,
            mode=self.mode,
        )
        # Slot j belongs to latent step j // latents_per_step, which replaced that written step if it was removed.
        replaced = [j // self.latents_per_step for j in range(n_latent)]
        boxes = example.step_boxes or ()
        return TrainingItem(
            id=example.id,
            image=example.image,
            prompt=format_prompt_text(example.question, example.choices),
            n_latent=n_latent,
            target=target_text(steps[removed:], example.answer),
            latent_steps=tuple(steps[t] if t < removed else None for t in replaced),
            latent_boxes=tuple(boxes[t] if t < removed and t < len(boxes) else None for t in replaced),
        )


class CurriculumDataset(Sequence[TrainingItem]):
    """Examples as `TrainingItem`s of the current stage; the trainer calls `set_epoch` before each epoch."""

    def __init__(self, examples: Sequence[Example], curriculum: Curriculum, epoch: int = 0):
        self.examples = examples
        self.curriculum = curriculum
        self.stage = curriculum.stage(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.stage = self.curriculum.stage(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TrainingItem:
        return self.curriculum.item(self.examples[index], self.stage)
