"""How cost grows as the work grows: the training step and answering, swept one axis at a time from a default point,
for several families, on the same weights at every point.

Axes (the others at the default point, 100 image tokens and 3 latent steps):

- image tokens {100, 256, 1024} and latent steps {1, 3, 6, 8}: one training step (forward + backward, batch 4) of
  ``cached`` (ivtlr), ``recompute`` (the original's algorithm: the prefix re-run at every step with eager attention
  maps, backward through every pass), ``plain`` (the model's own forward + backward over a latent-free sequence of
  the cached path's final length: the floor) and ``chain`` (the same sequence through the model's own decoder in
  the chain's passes on one cache, nothing of ivtlr's around them: what the passes themselves cost, so that
  ``cached / chain`` is ivtlr's own overhead);
- batch {1, 4, 16}, and image tokens at the smallest and largest batch: answering with ``answer_tokens`` tokens,
  ``ivtlr`` (latent chain + decoding on its cache) against ``nocot`` (the model's own batched ``generate`` on the
  prompt alone, the same answer length). Each answering point also records the method's arithmetic floors against
  No-CoT: the rows the decoder must run (the steps' K + 1 inserted rows on top of the prompt) and the decoder passes
  (one per latent step on top of one per answer token), the ratio a perfect implementation reaches when rows (large
  batches) or per-pass costs (batch 1, small models) dominate.

Each family's image is sized to give exactly the requested number of image tokens. A variant whose calls would take
more than ``--max-seconds`` at a point is skipped there, with a note (the estimate is one timed call). Writes JSON and
a PNG of the ratio curves (``--plot``), prints a table. Run ``ivtlr bench scaling --help`` for the options.
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import DynamicCache

from ivtlr import IVTLR
from ivtlr.backbones import tiny_spec
from ivtlr.data.collate import TOKEN_TYPE_KEYS
from ivtlr.method.loss import shifted_cross_entropy
from ivtlr.testing import FAMILIES, TinyBundle, build_tiny, make_test_image

from ivtlr.bench.common import (BenchModelSizes, Target, apply_cpu_settings, benchmark_parser, chat_prompts, filler_ids,
                                format_table, machine_info, parse_benchmark_args, peak_bytes, report, synchronize,
                                time_interleaved)

logger = logging.getLogger("bench_scaling")

DEFAULT_OUT = Path("benchmarks") / "results" / "scaling.json"  # relative to where it runs
TRAINING_VARIANTS = ("cached", "chain", "recompute", "plain")
#: Ratios taken round by round (each round times every variant once, back to back), then their median: drift of the
#: machine's speed between rounds cancels out of each ratio.
PAIRED_RATIOS = (("cached", "plain"), ("chain", "plain"), ("recompute", "plain"), ("cached", "chain"),
                 ("recompute", "cached"), ("ivtlr", "nocot"))
ANSWERING_VARIANTS = ("ivtlr", "nocot")


@dataclass(frozen=True)
class ScalingConfig(BenchModelSizes):
    """The model (the engine benchmark's sizes) and the sweep."""

    num_selected_patches: int = 32
    question_tokens: int = 80
    train_answer_tokens: int = 100  # labelled tokens of a training sample
    answer_tokens: int = 10  # generated tokens when answering (the paper's AR steps)
    train_batch: int = 4
    default_image_tokens: int = 100
    default_latents: int = 3
    image_tokens: tuple[int, ...] = (100, 256, 1024)
    latent_steps: tuple[int, ...] = (1, 3, 6, 8)
    batches: tuple[int, ...] = (1, 4, 16)
    families: tuple[str, ...] = ("qwen2_vl", "chameleon", "qwen3_vl")

    @property
    def answering_image_batches(self) -> tuple[int, ...]:
        """Batches the answering image-token axis is measured at: the smallest and the largest."""
        return tuple(sorted({min(self.batches), max(self.batches)}))


QUICK = ScalingConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      num_selected_patches=4, question_tokens=8, train_answer_tokens=8, answer_tokens=4,
                      train_batch=2, default_image_tokens=16, default_latents=1, image_tokens=(16, 64),
                      latent_steps=(1, 2), batches=(1, 4), families=("qwen2_vl", "chameleon"))


@dataclass
class Point:
    """One measured point: which axis, its setting, and each variant's median time and peak memory (None: skipped)."""

    family: str
    kind: str  # "training" or "answering"
    axis: str  # "image_tokens", "latent_steps" or "batch"
    image_tokens: int
    latent_steps: int
    batch: int
    ms: dict[str, float | None] = field(default_factory=dict)
    peak_mib: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    floors: dict[str, float] = field(default_factory=dict)  # answering: the method's arithmetic floors vs No-CoT
    paired: dict[str, float] = field(default_factory=dict)  # "a/b": median over rounds of a's time / b's time

    def ratio(self, numerator: str, denominator: str, of: str = "ms") -> float | None:
        """Time (the paired median, see :data:`PAIRED_RATIOS`) or peak memory of one variant over another's."""
        if of == "ms" and f"{numerator}/{denominator}" in self.paired:
            return self.paired[f"{numerator}/{denominator}"]
        values = getattr(self, "ms" if of == "ms" else "peak_mib")
        top, bottom = values.get(numerator), values.get(denominator)
        return top / bottom if top is not None and bottom else None


def pixels_per_token_side(family: str) -> float:
    """Image side (px) per image-token side for a family's tiny processor, from one encoded picture."""
    side = tiny_spec(family).default_image_size
    bundle = build_tiny(family, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    return side / math.sqrt(_image_tokens(bundle, side))


def _image_tokens(bundle: TinyBundle, side: int) -> int:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    text = bundle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = bundle.processor(text=[text], images=[make_test_image((side, side))], return_tensors="pt")
    return int((encoded["input_ids"] == bundle.image_token_id).sum())


def model_for(family: str, config: ScalingConfig, image_tokens: int, px_per_side: float
              ) -> tuple[TinyBundle, int] | None:
    """The family's benchmark model and the square image side giving exactly ``image_tokens`` tokens (None if that
    side gives another count)."""
    side = round(math.sqrt(image_tokens) * px_per_side)
    bundle = build_tiny(family, hidden_size=config.hidden_size, num_layers=config.num_layers,
                        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                        intermediate_size=config.intermediate_size, image_size=side)
    return (bundle, side) if _image_tokens(bundle, side) == image_tokens else None


def _prompts(bundle: TinyBundle, side: int, config: ScalingConfig, batch: int) -> tuple[dict, dict]:
    """Equal-length chat prompts, one picture each: (processor outputs, vision inputs without ids and masks)."""
    encoded = chat_prompts(bundle, config.question_tokens, side, batch)
    vision = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask", *TOKEN_TYPE_KEYS)}
    return encoded, vision


@dataclass
class TrainingBatches:
    """The same samples as the latent chain takes them and as a plain latent-free sequence of the final length."""

    latent: dict[str, torch.Tensor]
    plain: dict[str, torch.Tensor]
    vision: dict[str, torch.Tensor]
    widths: list[int]  # rows of each chain pass: the prompt, then each step's patches + 1 (the answer with the last)


def inserted_patches(image_tokens: int, k: int, steps: int) -> list[int]:
    """Patches each latent step inserts: K while the image has untaken ones, then what is left (a patch is never
    inserted twice), e.g. 32, 32, 32, 4, 0, 0 for 100 image tokens."""
    return [max(0, min(k, image_tokens - k * step)) for step in range(steps)]


def training_batches(bundle: TinyBundle, side: int, config: ScalingConfig, latents: int) -> TrainingBatches:
    """Batch-4 chat samples with a picture, ``latents`` latent slots and a labelled answer, both ways."""
    encoded, vision = _prompts(bundle, side, config, config.train_batch)
    prompt = encoded["input_ids"]
    batch, prompt_length = prompt.shape
    answer = torch.tensor(filler_ids(bundle, config.train_answer_tokens - 1) + [bundle.eos_token_id]).expand(batch, -1)
    middle_latent = torch.full((batch, latents), bundle.latent_token_id)
    # as long as the chain's final sequence, whose steps stop inserting once the image is used up
    patches = inserted_patches(int((prompt[0] == bundle.image_token_id).sum()), config.num_selected_patches, latents)
    middle_plain = torch.tensor(filler_ids(bundle, sum(patches) + latents)).expand(batch, -1)

    def sample(middle: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = torch.cat([prompt, middle, answer], dim=1)
        labels = torch.cat([torch.full_like(prompt, -100), torch.full_like(middle, -100), answer], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **vision}

    latent_batch, plain_batch = sample(middle_latent), sample(middle_plain)
    for key in TOKEN_TYPE_KEYS:  # the model's own forward places its multimodal positions with them
        if key in encoded:
            extra = plain_batch["input_ids"].shape[1] - prompt_length
            plain_batch[key] = torch.cat([encoded[key], torch.zeros(batch, extra, dtype=encoded[key].dtype)], dim=1)
    widths = [prompt_length] + [n + 1 for n in patches]
    widths[-1] += answer.shape[1]
    return TrainingBatches(latent_batch, plain_batch, vision, widths)


def training_steps(bundle: TinyBundle, side: int, config: ScalingConfig, latents: int
                   ) -> dict[str, Callable[[], object]]:
    """One forward + backward per variant over the same samples (plain and chain: a latent-free sequence as long as
    the final IVT-LR one)."""
    batches = training_batches(bundle, side, config, latents)
    options = {"num_selected_patches": config.num_selected_patches, "pad_token_id": bundle.pad_token_id}
    cached = IVTLR(bundle.model, bundle.latent_token_id, **options)
    recompute = IVTLR(bundle.model, bundle.latent_token_id, recompute=True, **options)
    return {"cached": lambda: cached(**batches.latent).loss.backward(),
            "chain": lambda: chain_floor_loss(cached, batches.plain, batches.widths, batches.vision).backward(),
            "recompute": lambda: recompute(**batches.latent).loss.backward(),
            "plain": lambda: bundle.model(**batches.plain).loss.backward()}


def chain_floor_loss(engine: IVTLR, plain_batch: dict[str, torch.Tensor], widths: list[int],
                     vision: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of the plain sequence computed as the latent chain must: the model's own embedding (vision tower
    included) and decoder, called once per chain pass over that pass's rows (the prompt, then each step's K + 1 rows,
    the answer with the last) on one key/value cache, with nothing of ivtlr's around the calls (no attention rows, no
    patch selection, no per-sample bookkeeping). What any cached implementation of the method pays: the floor of
    ``cached`` once the passes themselves are counted."""
    backbone = engine.backbone
    embedded = backbone.embed(plain_batch["input_ids"], vision)
    batch = embedded.embeds.shape[0]
    cache = DynamicCache(config=backbone.decoder().config)
    hidden, start = [], 0
    for width in widths:
        rows = slice(start, start + width)
        positions = torch.arange(start, start + width).expand(backbone.position_rows, batch, -1)
        features = embedded.row_features[:, rows] if embedded.row_features is not None else None
        visual = embedded.image_mask[:, rows] if features is not None else None
        hidden.append(backbone.run_decoder(embedded.embeds[:, rows], None, positions, cache, row_features=features,
                                           visual=visual).last_hidden_state)
        start += width
    return shifted_cross_entropy(backbone.logits(torch.cat(hidden, dim=1)), plain_batch["labels"])[0]


def answering_floors(prompt_rows: int, image_tokens: int, config: ScalingConfig) -> dict[str, float]:
    """ivtlr ÷ No-CoT for a perfect implementation of each: ``rows``, the decoder rows per question (the prompt, each
    step's K patches and latent, the answer tokens fed back); ``passes``, the sequential decoder calls (prompt, one per
    latent step, one per answer token after the first)."""
    steps, answer = config.default_latents, config.answer_tokens
    nocot_rows = prompt_rows + answer - 1
    inserted = sum(inserted_patches(image_tokens, config.num_selected_patches, steps)) + steps
    return {"rows": (nocot_rows + inserted) / nocot_rows,
            "passes": (steps + answer) / answer}


def answering_calls(bundle: TinyBundle, side: int, config: ScalingConfig, batch: int, point: Point | None = None
                    ) -> dict[str, Callable[[], object]]:
    """Answer ``batch`` questions with exactly ``answer_tokens`` tokens each: ivtlr against No-CoT ``generate``
    (``point``, if given, receives the method's floors for this prompt)."""
    encoded, vision = _prompts(bundle, side, config, batch)
    if point is not None:
        point.floors = answering_floors(encoded["input_ids"].shape[1],
                                        int((encoded["input_ids"][0] == bundle.image_token_id).sum()), config)
    latents = torch.full((batch, config.default_latents), bundle.latent_token_id)
    ids = torch.cat([encoded["input_ids"], latents], dim=1)
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=config.num_selected_patches,
                   pad_token_id=bundle.pad_token_id)
    new = config.answer_tokens

    @torch.no_grad()
    def ours() -> object:
        return engine.generate(ids, torch.ones_like(ids), max_new_tokens=new, eos_token_id=[], **vision)

    @torch.no_grad()
    def nocot() -> object:
        return bundle.model.generate(**encoded, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    return {"ivtlr": ours, "nocot": nocot}


def measure(calls: dict[str, Callable[[], object]], point: Point, *, warmup: int, repeats: int, max_seconds: float,
            prepare: Callable[[], object], device: torch.device) -> None:
    """Median time and peak memory of each call, skipping (with a note) a variant whose calls would take longer
    than ``max_seconds`` at this point."""
    kept = {}
    for name, call in calls.items():
        prepare()
        start = time.perf_counter()
        call()
        synchronize(device)
        estimate = (time.perf_counter() - start) * (warmup + repeats + 1)
        if estimate > max_seconds:
            point.ms[name] = point.peak_mib[name] = None
            point.notes.append(f"{name} skipped: one call took {estimate / (warmup + repeats + 1):.1f} s, "
                               f"{warmup + repeats + 1} calls would exceed {max_seconds:.0f} s")
            continue
        kept[name] = call
    times = time_interleaved(kept, device, warmup, repeats, prepare)
    for name, call in kept.items():
        prepare()
        point.ms[name] = 1e3 * statistics.median(times[name])
        point.peak_mib[name] = peak_bytes(call, device) / 2**20
    for numerator, denominator in PAIRED_RATIOS:
        if numerator in kept and denominator in kept:
            point.paired[f"{numerator}/{denominator}"] = statistics.median(
                a / b for a, b in zip(times[numerator], times[denominator]))


def sweep(config: ScalingConfig, args: argparse.Namespace, device: torch.device) -> list[Point]:
    points = []
    for family in config.families:
        px = pixels_per_token_side(family)
        for tokens in config.image_tokens:
            latent_axis = config.latent_steps if tokens == config.default_image_tokens else (config.default_latents,)
            built = model_for(family, config, tokens, px)
            if built is None:
                logger.warning("%s: no image size gives %d image tokens; skipped", family, tokens)
                continue
            bundle, side = built
            bundle.model.to(device).train()
            for latents in latent_axis:
                axis = "latent_steps" if tokens == config.default_image_tokens else "image_tokens"
                point = Point(family, "training", axis, tokens, latents, config.train_batch)
                measure(training_steps(bundle, side, config, latents), point, warmup=args.warmup, repeats=args.repeats,
                        max_seconds=args.max_seconds, prepare=lambda m=bundle.model: m.zero_grad(set_to_none=True),
                        device=device)
                points.append(point)
                logger.info("%s training %s: %s", family, _setting(point), _short(point))
            bundle.model.eval()
            on_batch_axis = tokens == config.default_image_tokens
            for batch in config.batches if on_batch_axis else config.answering_image_batches:
                point = Point(family, "answering", "batch" if on_batch_axis else "image_tokens", tokens,
                              config.default_latents, batch)
                measure(answering_calls(bundle, side, config, batch, point), point, warmup=args.warmup,
                        repeats=args.repeats, max_seconds=args.max_seconds, prepare=lambda: None, device=device)
                points.append(point)
                logger.info("%s answering %s: %s", family, _setting(point), _short(point))
    return points


def _setting(point: Point) -> str:
    return f"{point.image_tokens} image tokens, {point.latent_steps} latent steps, batch {point.batch}"


def _short(point: Point) -> str:
    return ", ".join(f"{k} {v:.0f} ms" if v is not None else f"{k} skipped" for k, v in point.ms.items())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_table(points: Sequence[Point]) -> str:
    rows = []
    for p in points:
        if p.kind == "training":
            rows.append([p.family, p.kind, p.image_tokens, p.latent_steps, p.batch, _fmt(p.ms.get("cached")),
                         _fmt(p.ratio("cached", "plain")), _fmt(p.ratio("chain", "plain")),
                         _fmt(p.ratio("cached", "chain")), _fmt(p.ratio("recompute", "plain")),
                         _fmt(p.ratio("recompute", "cached")), _fmt(p.ratio("cached", "plain", of="mem")), "-", "-"])
        else:
            rows.append([p.family, p.kind, p.image_tokens, p.latent_steps, p.batch, _fmt(p.ms.get("ivtlr")),
                         _fmt(p.ratio("ivtlr", "nocot")), "-", "-", "-", "-", "-", _fmt(p.floors.get("rows")),
                         _fmt(p.floors.get("passes"))])
    return format_table(["family", "kind", "img tok", "latents", "batch", "ours ms", "ours/base", "chain/base",
                         "ours/chain", "orig/base", "orig/ours", "mem ours/base", "rows/base", "passes/base"], rows)


def targets(points: Sequence[Point], config: ScalingConfig) -> list[Target]:
    """The scaling study's goals, each over every measured point (the worst one)."""
    training = [p for p in points if p.kind == "training" and p.ratio("cached", "plain") is not None]
    default = [p for p in training if (p.image_tokens, p.latent_steps) ==
               (config.default_image_tokens, config.default_latents)]
    answering = [p for p in points if p.kind == "answering" and p.ratio("ivtlr", "nocot")]
    found = []
    if training:
        found.append(Target("training step cached / plain, worst point",
                            max(p.ratio("cached", "plain") for p in training), 1.1, at_most=True))
    if default:
        found.append(Target("cached peak memory / plain at the default point, worst family",
                            max(p.ratio("cached", "plain", of="mem") for p in default), 1.1, at_most=True))
    big, one = max(config.batches), min(config.batches)
    for tokens in (config.default_image_tokens, max(config.image_tokens)):
        at = "" if tokens == config.default_image_tokens else f", {tokens} image tokens"
        widest = [p for p in answering if (p.batch, p.image_tokens) == (big, tokens)]
        single = [p for p in answering if (p.batch, p.image_tokens) == (one, tokens)]
        if widest:
            found.append(Target(f"answering at batch {big}{at}: ivtlr questions/s / No-CoT, worst family",
                                min(1 / p.ratio("ivtlr", "nocot") for p in widest), 0.8, at_most=False))
        if single:
            found.append(Target(f"answering at batch {one}{at}: ivtlr latency / No-CoT, worst family",
                                max(p.ratio("ivtlr", "nocot") for p in single), 1.25, at_most=True))
    return found


def plot(points: Sequence[Point], path: Path) -> None:
    """Ratio curves against each axis: ours/plain (solid), the chain floor/plain (dotted) and original/plain (dashed)
    per family for training;
    ivtlr/No-CoT time per batch, and per image-token count at the smallest (dashed) and largest (solid) batch, for
    answering, with the method's row floor (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = (("image_tokens", "image tokens (training)", "training"),
              ("latent_steps", "latent steps (training)", "training"),
              ("batch", "batch (answering)", "answering"), ("image_tokens", "image tokens (answering)", "answering"))
    families = sorted({p.family for p in points})
    colours = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    answering = [p for p in points if p.kind == "answering"]
    image_batches = sorted({p.batch for p in answering if p.axis == "image_tokens"})
    for ax, (axis, label, kind) in zip(axes, panels):
        for family in families:
            if kind == "training":
                members = sorted((p for p in points if p.family == family and p.kind == kind and
                                  (p.axis == axis or _on_default(p, points, axis))), key=lambda p: getattr(p, axis))
                xs = [getattr(p, axis) for p in members]
                for numerator, style, name in (("cached", "-", "ours"), ("chain", ":", "chain floor"),
                                               ("recompute", "--", "original")):
                    ys = [p.ratio(numerator, "plain") for p in members]
                    ax.plot([x for x, y in zip(xs, ys) if y], [y for y in ys if y], style, marker="o",
                            markersize=3 if numerator == "chain" else 5, color=colours[family],
                            label=f"{family} {name}")
                continue
            curves = [(None, "-")] if axis == "batch" else \
                [(b, "-" if b == max(image_batches) else "--") for b in image_batches]
            for batch, style in curves:
                members = sorted((p for p in answering if p.family == family and (
                    p.axis == "batch" if batch is None else p.batch == batch)), key=lambda p: getattr(p, axis))
                xs = [getattr(p, axis) for p in members]
                ys = [p.ratio("ivtlr", "nocot") for p in members]
                ax.plot([x for x, y in zip(xs, ys) if y], [y for y in ys if y], style, marker="o",
                        color=colours[family], label=family if batch is None else f"{family}, batch {batch}")
                if family == families[0]:
                    ax.plot(xs, [p.floors.get("rows") for p in members], ":", color="black", linewidth=1,
                            label="row floor" if batch in (None, image_batches[0]) else None)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("time / plain" if kind == "training" else "ivtlr time / No-CoT time")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _on_default(point: Point, points: Sequence[Point], axis: str) -> bool:
    """The default point belongs to both training axes."""
    return point.axis == "latent_steps" and axis == "image_tokens" and point.latent_steps == min(
        (p.latent_steps for p in points if p.family == point.family and p.axis == "image_tokens"), default=-1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__.split("\n\n")[0], DEFAULT_OUT, warmup=1, unit="call")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=None,
                        help="model types to sweep (default: qwen2_vl chameleon qwen3_vl; --quick: two)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip a variant at a point when its calls would take longer than this")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the ratio curves (default: next to --out)")
    return parse_benchmark_args(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    apply_cpu_settings(args)
    config = QUICK if args.quick else ScalingConfig()
    if args.families:
        config = replace(config, families=tuple(args.families))
    points = sweep(config, args, device)
    plot_path = args.plot or Path(args.out).with_suffix(".png")
    plot(points, plot_path)
    table = results_table(points)
    notes = [f"{p.family} {_setting(p)}: {note}" for p in points for note in p.notes]
    return report("scaling", table + ("\n\n" + "\n".join(notes) if notes else ""), targets(points, config), args.out,
                  machine=machine_info(device),
                  config={**asdict(config), "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
                          "max_seconds": args.max_seconds, "plot": str(plot_path)},
                  results={"points": [asdict(p) for p in points]})
