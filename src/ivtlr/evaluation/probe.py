"""Do a checkpoint's latents matter? Accuracy of the same questions under counterfactual latent chains.

Each condition answers the whole split once, batched: fewer latent steps, another K, or one intervention on the
latent text (what the slots receive) or the latent vision (which patches are inserted), the rest as trained. All
conditions at the trained number of latent steps share one prompt pass per batch (:meth:`IVTLR.generate_variants`).
The two donor conditions (another question's latent rows, the same indices read from another image) need the
as-trained latent rows of their donor first, so they run in a second sweep. A question's donor is the next question
of the split (the last one's is the first): a fixed derangement, so a result never depends on the batch size.
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ivtlr.data import Example
from ivtlr.method.interventions import LatentIntervention
from ivtlr.evaluation.answers import ExtractionRule
from ivtlr.evaluation.records import wilson_interval
from ivtlr.evaluation.arguments import PROBE_GROUPS
from ivtlr.loading import LoadedModel
from ivtlr.evaluation.runner import Answer, batched, model_inputs, prediction_record

logger = logging.getLogger(__name__)

GROUP_TITLES = {"trained": "as trained", "count": "latent steps", "k": "patches per step (K)",
                "text": "latent text", "vision": "latent vision"}
TEXT_LABELS = {"zeros": "zeros", "noise": "Gaussian noise, same norm", "donor": "another question's latents",
               "token": "the <|latent|> embedding"}
VISION_LABELS = {"random": "K random patches", "least": "K least attended", "none": "no patches",
                 "donor": "same indices, another image"}


@dataclass(frozen=True)
class ProbeCondition:
    """One way of answering the split."""

    group: str  # "trained" or one of PROBE_GROUPS
    name: str  # what the report calls it
    n_latent: int
    text: str = "trained"
    vision: str = "trained"
    num_selected_patches: int | None = None  # None: the checkpoint's K

    @property
    def needs_donor(self) -> bool:
        return self.text == "donor" or self.vision == "donor"

    def intervention(self, seeds: Sequence[int], donor_latents=None, donor_image_embeds=None) -> LatentIntervention:
        return LatentIntervention(text=self.text, vision=self.vision, num_selected_patches=self.num_selected_patches,
                                  seeds=seeds, donor_latents=donor_latents, donor_image_embeds=donor_image_embeds)


#: Why a family whose decoder adds per-row visual features (``Backbone.has_row_features``) has no donor-image run.
NO_IMAGE_DONORS = ("a patch row read from another image would lack that image's own per-row visual features, which "
                   "this family's decoder adds inside its layers")


def plan_conditions(n_latent: int, k: int, groups: Iterable[str] = PROBE_GROUPS, *,
                    image_donors: bool = True) -> list[ProbeCondition]:
    """The as-trained condition first, then each requested group's conditions (the as-trained point not repeated).

    Conditions the model cannot run are left out (:func:`skipped_conditions` says which and why): with no latent
    vision (K = 0) the K sweep and the vision interventions; without ``image_donors`` the donor-image condition.
    """
    groups = list(groups)
    unknown = sorted(set(groups) - set(PROBE_GROUPS))
    if unknown:
        raise ValueError(f"unknown probe condition group(s) {unknown}; choose from {PROBE_GROUPS}")
    if n_latent < 1:
        raise ValueError("the probe needs latent steps: this model answers with none (a No-CoT or CoT checkpoint?)")
    conditions = [ProbeCondition("trained", f"as trained (n={n_latent}, K={k})", n_latent)]
    if k == 0 and {"k", "vision"} & set(groups):
        logger.warning("K = 0 (no latent vision): skipping the K sweep and the latent vision interventions")
        groups = [g for g in groups if g not in ("k", "vision")]
    for group in PROBE_GROUPS:
        if group not in groups:
            continue
        if group == "count":
            conditions += [ProbeCondition("count", f"n={n}", n) for n in range(n_latent)]
        elif group == "k":
            sweep = sorted({max(k // 4, 1), max(k // 2, 1), 2 * k} - {k})
            conditions += [ProbeCondition("k", f"K={v}", n_latent, num_selected_patches=v) for v in sweep]
        elif group == "text":
            conditions += [ProbeCondition("text", label, n_latent, text=name) for name, label in TEXT_LABELS.items()]
        else:
            conditions += [ProbeCondition("vision", label, n_latent, vision=name)
                           for name, label in VISION_LABELS.items() if image_donors or name != "donor"]
    if not image_donors and "vision" in groups:
        logger.warning("skipping the donor-image condition: %s", NO_IMAGE_DONORS)
    return conditions


def skipped_conditions(k: int, groups: Iterable[str] = PROBE_GROUPS, *, image_donors: bool = True
                       ) -> list[dict[str, str]]:
    """The requested conditions :func:`plan_conditions` leaves out, each with the reason, for the report."""
    groups = set(groups)
    if k == 0:
        return [{"group": group, "name": GROUP_TITLES[group], "reason": "K = 0: the model inserts no patches"}
                for group in ("k", "vision") if group in groups]
    if not image_donors and "vision" in groups:
        return [{"group": "vision", "name": VISION_LABELS["donor"], "reason": NO_IMAGE_DONORS}]
    return []


@dataclass
class ConditionResult:
    """Per-question outcomes of one condition, in split order."""

    condition: ProbeCondition
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    letters: list[str | None] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)
    attention: list[tuple[float, float]] = field(default_factory=list)  # (latent rows, patch rows) per question
    #: the as-trained condition only: each question's fed-back latent rows (n_latent, D), on the CPU
    latents: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, example: Example, answer: Answer, attention: torch.Tensor, rule: ExtractionRule) -> None:
        record = prediction_record(example, answer, 0.0, rule)
        self.ids.append(example.id)
        self.texts.append(answer.text)
        self.letters.append(record.prediction)
        self.correct.append(record.correct)
        self.n_tokens.append(answer.n_tokens)
        self.attention.append((float(attention[0]), float(attention[1])))

    def summary(self, trained: ConditionResult) -> dict:
        """Accuracy with its 95 % Wilson interval, AR steps, attention masses and answers changed vs as trained."""
        n, correct = len(self.correct), sum(self.correct)
        low, high = wilson_interval(correct, n)
        by_id = dict(zip(trained.ids, trained.letters))
        changed = sum(letter != by_id.get(qid) for qid, letter in zip(self.ids, self.letters))
        return {**asdict(self.condition), "questions": n, "correct": correct, "accuracy": correct / n if n else 0.0,
                "accuracy_ci95": [low, high], "ar_steps": mean(self.n_tokens),
                "attention_on_latents": mean([a for a, _ in self.attention]),
                "attention_on_patches": mean([p for _, p in self.attention]),
                "answers_changed": changed / n if n else 0.0}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def question_seed(seed: int, example_id: str) -> int:
    """The draws of a question (noise, random patches) depend on the probe seed and its id only."""
    return zlib.crc32(f"{seed}:{example_id}".encode())


def run_probe(model: LoadedModel, examples: Sequence[Example], conditions: Sequence[ProbeCondition], *,
              batch_size: int, max_new_tokens: int, image_size: int | None, rule: ExtractionRule = "original",
              seed: int = 0, progress: bool = True) -> list[ConditionResult]:
    """Answer ``examples`` under every condition; ``conditions[0]`` must be the as-trained one."""
    if not conditions or conditions[0].group != "trained":
        raise ValueError("the first probe condition must be the as-trained one (plan_conditions puts it there)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not examples:
        raise ValueError("the probe needs at least one question")
    results = {c: ConditionResult(c) for c in conditions}
    direct = [c for c in conditions if not c.needs_donor]
    donor = [c for c in conditions if c.needs_donor]
    if donor and len(examples) < 2:
        raise ValueError("the donor conditions need at least two questions (each borrows another's latents)")
    trained_latents: dict[str, torch.Tensor] = {}
    total = len(examples) * len(conditions)
    with tqdm(total=total, desc="probe", unit="answer", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batched(examples, batch_size):
            for n_latent in sorted({c.n_latent for c in direct}, reverse=True):
                group = [c for c in direct if c.n_latent == n_latent]
                outs = _answer(model, batch, group, n_latent, max_new_tokens, image_size, seed)
                for condition, out in zip(group, outs):
                    _collect(results[condition], batch, out, model, rule)
                    if condition is conditions[0]:
                        trained_latents.update({e.id: rows.cpu() for e, rows in zip(batch, out.latents)})
                    bar.update(len(batch))
        if donor:
            position = {example.id: i for i, example in enumerate(examples)}
            for batch in batched(examples, batch_size):
                partners = [examples[(position[e.id] + 1) % len(examples)] for e in batch]
                donor_inputs = model_inputs(model, partners, 0, image_size)
                image_rows = model.engine.image_token_embeddings(**donor_inputs)
                latents = [trained_latents[p.id] for p in partners]
                outs = _answer(model, batch, donor, conditions[0].n_latent, max_new_tokens, image_size, seed,
                               donor_latents=latents, donor_image_embeds=image_rows)
                for condition, out in zip(donor, outs):
                    _collect(results[condition], batch, out, model, rule)
                    bar.update(len(batch))
    results[conditions[0]].latents = trained_latents
    return [results[c] for c in conditions]


def _answer(model: LoadedModel, batch: list[Example], conditions: Sequence[ProbeCondition], n_latent: int,
            max_new_tokens: int, image_size: int | None, seed: int, **donors):
    inputs = model_inputs(model, batch, n_latent, image_size)
    seeds = [question_seed(seed, e.id) for e in batch]
    interventions = [c.intervention(seeds, **donors) for c in conditions]
    return model.engine.generate_variants(**inputs, max_new_tokens=max_new_tokens,
                                          interventions=interventions, measure_attention=True)


def _collect(result: ConditionResult, batch: list[Example], out, model: LoadedModel, rule: ExtractionRule) -> None:
    for b, example in enumerate(batch):
        length = int(out.lengths[b])
        text = model.tokenizer.decode(out.sequences[b, :length].tolist(), skip_special_tokens=True)
        result.add(example, Answer(text=text, n_tokens=length, selected=out.selected[b]), out.answer_attention[b],
                   rule)


def probe_summary(results: Sequence[ConditionResult], run: dict, readback: dict | None = None,
                  skipped: Sequence[dict[str, str]] = ()) -> dict:
    """What ``probe.json`` holds: the run's settings, one summary per condition, as-trained first, and the conditions
    skipped with their reasons (:func:`skipped_conditions`); and, when given, what the latents read back as
    (:func:`ivtlr.evaluation.readback.readback_agreement`)."""
    trained = results[0]
    summary = {"run": dict(run), "conditions": [r.summary(trained) for r in results], "skipped": list(skipped)}
    if readback is not None:
        summary["readback"] = readback
    return summary

