"""The demo's report: each variant's numbers with confidence intervals, where its latent vision looked, the targets,
and the markdown / JSON / PNG files.

Everything here is computed from what the evaluation harness wrote (predictions JSONL and summaries) and from the
puzzles themselves, so the report adds nothing to and drops nothing from the harness's records.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ivtlr.data.digits import DigitPuzzle
from ivtlr.evaluation.probe_report import READBACK_NOTE, TABLE_NOTE, markdown_table, readback_table
from ivtlr.evaluation.records import wilson_interval
from ivtlr.demo.scheduler import minutes

#: The report's rows, in the paper's order: baselines, then the two ablations, then the method.
#: Every variant the demo can train, in report order: the baselines, the paper's objective (IVT-LR and its two
#: ablations) and the same three trained with the supervision that applies to each (``ivtlr.method.supervision``).
VARIANTS = ("nocot", "cot", "latent_text_only", "latent_vision_only", "ivtlr", "latent_text_only_supervised",
            "latent_vision_only_supervised", "ivtlr_supervised", "ivtlr_rl")
#: Trained with ``--full`` only, to keep the default demo short: the paper's two ablations (at chance on this task,
#: README, three seeds) and the two supervised ablations (README, three seeds).
FULL_ONLY_VARIANTS = ("latent_text_only", "latent_vision_only", "latent_text_only_supervised",
                      "latent_vision_only_supervised")
#: Trained with ``--rl`` only: GRPO from the supervised IVT-LR checkpoint (``ivtlr rl``).
RL_VARIANTS = ("ivtlr_rl",)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in FULL_ONLY_VARIANTS + RL_VARIANTS)
VARIANT_LABELS = {
    "nocot": "No-CoT",
    "cot": "CoT",
    "latent_text_only": "latent text only (Coconut, K=0)",
    "latent_vision_only": "latent vision only",
    "ivtlr": "IVT-LR (paper's objective)",
    "latent_text_only_supervised": "latent text only + step loss",
    "latent_vision_only_supervised": "latent vision only + region loss",
    "ivtlr_supervised": "IVT-LR + step and region losses",
    "ivtlr_rl": "IVT-LR + losses, then GRPO",
}
#: The training mode of each variant (a supervised variant trains its mode with the supervision losses on).
VARIANT_MODES = {variant: variant.removesuffix("_supervised").removesuffix("_rl") for variant in VARIANTS}
LATENT_VARIANTS = tuple(v for v in VARIANTS if VARIANT_MODES[v] not in ("cot", "nocot"))
#: Variants the demo probes (``ivtlr probe``): the method under either objective, and after RL.
PROBED_VARIANTS = ("ivtlr", "ivtlr_supervised", "ivtlr_rl")
#: Acceptance targets on the test split, for IVT-LR with supervision: at least 75 %, No-CoT + 35 points and CoT - 10
#: points, at most a quarter of CoT's AR steps, at least 80 % of its inserted patches in the cell the step reads,
#: and latents that matter (another question's latents change 60 % of answers, K random patches cost 10 points).
TARGET_ACCURACY = 0.75
TARGET_MARGIN_OVER_NOCOT = 0.35
TARGET_SLACK_UNDER_COT = 0.10
TARGET_AR_FRACTION_OF_COT = 0.25
TARGET_RIGHT_CELL = 0.80
TARGET_DONOR_CHANGED = 0.60
TARGET_RANDOM_PATCH_COST = 0.10


def cell_of_token(token: int, grid_hw: tuple[int, int], grid: int) -> int:
    """The puzzle cell (row-major) an image token lies in, on a token grid that tiles the puzzle's cells evenly."""
    rows, cols = grid_hw
    row, col = divmod(token, cols)
    return (row * grid // rows) * grid + col * grid // cols


def look_rates(records: Sequence[Mapping], puzzles: Mapping[str, DigitPuzzle], grid_hw: tuple[int, int]
               ) -> list[dict[str, float]]:
    """Per latent step: the share of its inserted patches that lie in the cell the matching written step reads, and
    the share K patches drawn at random among those still selectable would give (chosen patches are never inserted
    twice, so later steps draw from fewer)."""
    n_steps = max((len(r.get("selected") or []) for r in records), default=0)
    hits, chance, counted = [0.0] * n_steps, [0.0] * n_steps, [0] * n_steps
    n_tokens = grid_hw[0] * grid_hw[1]
    for record in records:
        puzzle = puzzles[record["id"]]
        cells = [cell_of_token(t, grid_hw, puzzle.grid) for t in range(n_tokens)]
        taken: set[int] = set()
        for step, indices in enumerate(record.get("selected") or []):
            right_cell = puzzle.step_cells[step] if step < len(puzzle.step_cells) else None
            if right_cell is None or not indices:
                taken.update(indices)
                continue
            hits[step] += sum(cells[i] == right_cell for i in indices) / len(indices)
            free = [t for t in range(n_tokens) if t not in taken]
            chance[step] += sum(cells[t] == right_cell for t in free) / len(free)
            counted[step] += 1
            taken.update(indices)
    return [{"step": s + 1, "rate": hits[s] / counted[s], "chance": chance[s] / counted[s], "questions": counted[s]}
            for s in range(n_steps) if counted[s]]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def variant_row(records_test: Sequence[Mapping], summary_test: dict, summary_val: dict, train_seconds: float,
                puzzles: Mapping[str, DigitPuzzle], grid_hw: tuple[int, int]) -> dict:
    """The report's numbers for one variant: test accuracy with its 95 % interval, AR steps (generated tokens),
    s/question, validation accuracy and, for latent variants, where each latent step looked."""
    test, val = summary_test["overall"], summary_val["overall"]
    correct = sum(bool(r["correct"]) for r in records_test)
    low, high = wilson_interval(correct, len(records_test))
    return {"accuracy": test["accuracy"], "accuracy_ci95": [low, high], "ar_steps": test["avg_generated_tokens"],
            "seconds_per_question": test["seconds_per_question"], "validation_accuracy": val["accuracy"],
            "test_questions": test["count"], "unanswered": test["unanswered"],
            "looked_at_right_cell": look_rates(records_test, puzzles, grid_hw), "train_seconds": train_seconds}


def target_checks(rows: Mapping[str, Mapping], probes: Mapping[str, Mapping] | None = None) -> dict[str, bool]:
    """The acceptance targets of IVT-LR with supervision, on the test split (and its probe, where given)."""
    ivtlr, cot, nocot = rows["ivtlr_supervised"], rows["cot"], rows["nocot"]
    looks = ivtlr.get("looked_at_right_cell") or []
    checks = {
        "supervised_ivtlr_accuracy_at_least_75_percent": ivtlr["accuracy"] >= TARGET_ACCURACY,
        "supervised_ivtlr_at_least_nocot_plus_35_points":
            ivtlr["accuracy"] >= nocot["accuracy"] + TARGET_MARGIN_OVER_NOCOT,
        "supervised_ivtlr_at_least_cot_minus_10_points": ivtlr["accuracy"] >= cot["accuracy"] - TARGET_SLACK_UNDER_COT,
        "supervised_ivtlr_ar_steps_at_most_a_quarter_of_cot":
            ivtlr["ar_steps"] <= TARGET_AR_FRACTION_OF_COT * cot["ar_steps"],
        "supervised_ivtlr_right_cell_at_least_80_percent_every_step":
            bool(looks) and all(look["rate"] >= TARGET_RIGHT_CELL for look in looks),
    }
    for ablation in ("latent_text_only_supervised", "latent_vision_only_supervised"):
        if ablation in rows:
            checks[f"supervised_ivtlr_above_{ablation}"] = ivtlr["accuracy"] > rows[ablation]["accuracy"]
    checks.update(_rl_checks(rows, probes or {}))
    probe = (probes or {}).get("ivtlr_supervised")
    if probe is not None:
        donor = probe_row(probe, text="donor")
        random = probe_row(probe, vision="random")
        trained = probe["conditions"][0]
        if donor is not None:
            checks["supervised_ivtlr_donor_latents_change_60_percent_of_answers"] = \
                donor["answers_changed"] >= TARGET_DONOR_CHANGED
        if random is not None:
            checks["supervised_ivtlr_random_patches_cost_10_points"] = \
                trained["accuracy"] - random["accuracy"] >= TARGET_RANDOM_PATCH_COST
    return checks


def _rl_checks(rows: Mapping[str, Mapping], probes: Mapping[str, Mapping]) -> dict[str, bool]:
    """With ``--rl``: RL beats the checkpoint it started from, and the latents still matter as much after it
    (another question's latents change at least as many validation answers)."""
    if "ivtlr_rl" not in rows:
        return {}
    checks = {"rl_above_the_supervised_checkpoint": rows["ivtlr_rl"]["accuracy"] > rows["ivtlr_supervised"]["accuracy"]}
    before, after = probes.get("ivtlr_supervised"), probes.get("ivtlr_rl")
    if before is not None and after is not None:
        donor_before, donor_after = probe_row(before, text="donor"), probe_row(after, text="donor")
        if donor_before is not None and donor_after is not None:
            checks["rl_donor_latents_change_at_least_as_many_answers"] = \
                donor_after["answers_changed"] >= donor_before["answers_changed"]
    return checks


def probe_row(probe: Mapping, text: str = "trained", vision: str = "trained") -> Mapping | None:
    """The probe condition with this latent text and latent vision intervention (one of them as trained)."""
    return next((row for row in probe["conditions"] if row["group"] != "trained" and row["text"] == text
                 and row["vision"] == vision), None)


def _looks(row: Mapping) -> str:
    looks = row.get("looked_at_right_cell") or []
    return " / ".join(f"{step['step']}: {100 * step['rate']:.0f}" for step in looks) if looks else "-"


def results_table(report: Mapping) -> str:
    """The markdown table of every variant's numbers."""
    lines = ["| variant | test accuracy (%) | 95 % CI | validation (%) | AR steps | s/question | right cell by "
             "latent step (%) | training (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, row in report["variants"].items():
        low, high = row["accuracy_ci95"]
        lines.append(f"| {VARIANT_LABELS[variant]} | {100 * row['accuracy']:.1f} | {100 * low:.1f}-{100 * high:.1f} | "
                     f"{100 * row['validation_accuracy']:.1f} | {row['ar_steps']:.1f} | "
                     f"{row['seconds_per_question']:.4f} | {_looks(row)} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def chance_line(report: Mapping) -> str:
    """What K random patches would give per step (from IVT-LR's own exclusions)."""
    looks = report["variants"].get("ivtlr_supervised", {}).get("looked_at_right_cell") or []
    return " / ".join(f"{step['step']}: {100 * step['chance']:.0f}" for step in looks) if looks else "-"


def markdown_report(report: Mapping) -> str:
    recipe = report["recipe"]
    phases = ", ".join(f"{name} {minutes(seconds)}" for name, seconds in report["phase_seconds"].items())
    lines = ["# IVT-LR demo: following pointers through handwritten digits, tiny Qwen2-VL trained on a CPU", "",
             f"{recipe['n_train']} training, {recipe['n_val']} validation and {recipe['n_test']} test questions "
             f"({'quick smoke run' if report['quick'] else 'full recipe'}, seed {report['seed']}); wall time "
             f"{minutes(report['wall_seconds'])} on {report['cpu']} with {report['workers']} parallel run(s) of "
             f"{report['threads_per_worker']} thread(s) ({phases}).", "", results_table(report), "",
             "Test accuracy with its 95 % Wilson interval. AR steps: generated tokens per question (EOS included). "
             f"s/question: generation wall time per question in batches of {recipe['eval_batch_size']}. Right cell: "
             "the share of the patches each latent step inserted that lie in the cell the matching written step "
             f"reads (K random selectable patches would give {chance_line(report)} %). Training (s) excludes the "
             f"shared runs: visual pre-training ({recipe['pretrain_epochs']} epochs, "
             f"{report['pretraining']['train_seconds']:.0f} s; it reads the named cell's digit in "
             f"{100 * report['pretraining']['reading_validation_accuracy']:.1f} % of validation images) and, for CoT "
             f"and the latent variants, stage 0 ({recipe['stage0_epochs']} epochs, {report['stage0_seconds']:.0f} s).",
             "", "Targets (test split):", ""]
    lines += [f"- {name.replace('_', ' ')}: {'met' if met else 'NOT met'}" for name, met in report["targets"].items()]
    lines += ["", f"![training curves]({report['files']['training_curve']})", ""]
    if report["files"].get("rl_curve"):
        lines += [f"![RL curves]({report['files']['rl_curve']})", ""]
    lines += [
              "Image cells each latent step of IVT-LR with supervision inserted, for a few test questions (the legend "
              "names the cell the written step reads and what the step's latent state decodes to):", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in report["files"]["explain"]]
    probes = report.get("probes") or {}
    if probes:
        lines += ["", "## Do the latents matter?", ""]
        for variant, probe in probes.items():
            lines += [probe_section(probe, report["files"]["probes"][variant], VARIANT_LABELS[variant]), ""]
    return "\n".join(lines) + "\n"


def probe_section(probe: Mapping, plot: str, label: str) -> str:
    """``ivtlr probe`` of one checkpoint, with what its rows say (and what its latents read back as, if probed)."""
    run = probe["run"]
    rows = {(row["group"], row["text"], row["vision"]): row for row in probe["conditions"]}
    trained = probe["conditions"][0]
    donor = rows.get(("text", "donor", "trained"))
    no_patches = rows.get(("vision", "trained", "none"))
    reading = []
    if donor is not None:
        reading.append(f"another question's latent rows give {100 * donor['accuracy']:.1f} % against "
                       f"{100 * trained['accuracy']:.1f} % as trained (answers changed: "
                       f"{100 * donor['answers_changed']:.1f} %)")
    if no_patches is not None:
        reading.append(f"inserting no patches gives {100 * no_patches['accuracy']:.1f} % (answers changed: "
                       f"{100 * no_patches['answers_changed']:.1f} %)")
    random = rows.get(("vision", "trained", "random"))
    if random is not None:
        reading.append(f"K random patches give {100 * random['accuracy']:.1f} %")
    summary = "; ".join(reading)
    parts = [
        f"### {label}", "",
        f"`ivtlr probe` of the checkpoint on the {run['questions']} {run['split']} questions "
        f"({run['wall_seconds']:.0f} s): each row answers them all with one change to the latent chain. "
        f"{summary[:1].upper() + summary[1:]}." if summary else "", "",
        markdown_table(probe), "", TABLE_NOTE, "", f"![probe]({plot})"]
    if "readback" in probe:
        parts += ["", readback_table(probe["readback"]), "", READBACK_NOTE]
    return "\n".join(parts)


def read_loss_curve(metrics_path: Path, first_epoch: int, resume_epoch: int) -> tuple[list[float], list[float]]:
    """(epochs into the whole schedule, loss) per optimizer step, from a run's ``metrics.jsonl``."""
    records = read_records(metrics_path)
    per_epoch: dict[int, int] = {}
    for record in records:
        per_epoch[record["epoch"]] = per_epoch.get(record["epoch"], 0) + 1
    seen: dict[int, int] = {}
    xs, ys = [], []
    for record in records:
        epoch = record["epoch"]
        seen[epoch] = seen.get(epoch, 0) + 1
        xs.append(first_epoch + epoch - resume_epoch + seen[epoch] / per_epoch[epoch])
        ys.append(record["loss"])
    return xs, ys


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        out.append(total / min(index + 1, window))
    return out


def plot_rl_curve(records: Sequence[Mapping], path: Path) -> Path:
    """GRPO's course: the rollouts' reward and accuracy per rollout batch (running mean over a tenth of the run), and
    the KL to the starting model when it was penalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(records) // 10)
    steps = [r["rollout_step"] for r in records]
    figure, axes = plt.subplots(figsize=(7, 4))
    same = all(r["reward"] == r["accuracy"] for r in records)  # no format reward: one line says both
    for key in ("reward",) if same else ("reward", "accuracy"):
        label = "rollout accuracy (= reward)" if same else f"rollout {key}"
        axes.plot(steps, running_mean([r[key] for r in records], window), label=label, linewidth=1.2)
    axes.set_xlabel("rollout batch")
    axes.set_ylabel("mean over the batch's rollouts")
    axes.legend(fontsize=8)
    axes.set_title("IVT-LR demo: GRPO on the latent chain")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_training_curves(curves: Mapping[str, tuple[list[float], list[float]]], stage_starts: Sequence[float],
                         path: Path) -> Path:
    """Training loss against epochs, one line per run (a running mean over a tenth of an epoch), dotted lines where
    latent stages begin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.8))
    for label, (xs, ys) in curves.items():
        steps_per_epoch = sum(1 for x in xs if x <= xs[0] + 1) or 1
        axes.plot(xs, running_mean(ys, max(1, steps_per_epoch // 10)), label=label, linewidth=1.2)
    for stage, start in enumerate(stage_starts, start=1):
        axes.axvline(start, color="grey", linestyle=":", linewidth=1)
        axes.text(start, 0.02, f" stage {stage}", transform=axes.get_xaxis_transform(), fontsize=8, rotation=90,
                  va="bottom")
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss (per labelled token)")
    axes.set_yscale("log")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set_title("IVT-LR demo: training loss")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
