"""The probe's outputs: ``probe.json`` (settings and one row per condition), ``probe.md`` (the table) and
``probe.png`` (accuracy per condition with 95 % intervals, one panel per group), each written atomically."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from ivtlr.files import write_text_atomically
from ivtlr.evaluation.probe import GROUP_TITLES, PROBE_GROUPS

logger = logging.getLogger(__name__)

TABLE_HEADER = ("| condition | accuracy (%) | 95 % CI | answers changed (%) | AR steps | attention on latents (%) | "
                "attention on patches (%) |\n|---|---:|---:|---:|---:|---:|---:|")


def markdown_table(summary: Mapping) -> str:
    """One row per condition, grouped, the as-trained row first."""
    lines = [TABLE_HEADER]
    current = None
    for row in summary["conditions"]:
        if row["group"] != current and row["group"] != "trained":
            current = row["group"]
            lines.append(f"| *{GROUP_TITLES[current]}* | | | | | | |")
        low, high = row["accuracy_ci95"]
        lines.append(f"| {row['name']} | {100 * row['accuracy']:.1f} | {100 * low:.1f}-{100 * high:.1f} | "
                     f"{100 * row['answers_changed']:.1f} | {row['ar_steps']:.1f} | "
                     f"{100 * row['attention_on_latents']:.1f} | {100 * row['attention_on_patches']:.1f} |")
    return "\n".join(lines)


TABLE_NOTE = ("Each condition answers every question of the split once; the rest of the chain runs as trained. Answers "
              "changed: the share of questions whose chosen option differs from the as-trained run. Attention: the "
              "mean share of attention (over layers, heads and answer tokens) the answer tokens pay to the latent "
              "rows and to the inserted patch rows.")


def readback_table(readback: Mapping) -> str:
    """Per latent step: how often its state decodes to the written step it replaced, and one example."""
    lines = ["| latent step | questions | decodes to its written step (%) | written | decoded |",
             "|---:|---:|---:|---|---|"]
    for entry in readback["steps"]:
        shown = entry["examples"][0] if entry["examples"] else {"written": "", "decoded": ""}
        lines.append(f"| {entry['step']} | {entry['questions']} | {100 * entry['match_rate']:.1f} | "
                     f"{shown['written']} | {shown['decoded']} |")
    return "\n".join(lines)


READBACK_NOTE = ("What each latent says: the state each latent step fed back, decoded greedily by the language model "
                 "on its own (no prompt, no image), cut at its first newline, against the written step it replaced.")


def skipped_note(summary: Mapping) -> str:
    """One line per condition the model could not run, with the reason; empty when none was skipped."""
    return "\n".join(f"Skipped: {entry['name']} ({GROUP_TITLES[entry['group']]}): {entry['reason']}."
                     for entry in summary.get("skipped", ()))


def markdown_report(summary: Mapping) -> str:
    run = summary["run"]
    head = (f"# Do the latents matter? `ivtlr probe` on {run['model']}\n\n"
            f"{run['questions']} questions of the {run['split']} split, answer rule `{run['answer_rule']}`, seed "
            f"{run['seed']}; {run['wall_seconds']:.0f} s on {run['cpu']} ({run['device']}).\n\n")
    skipped = skipped_note(summary)
    report = f"{head}{markdown_table(summary)}\n\n{TABLE_NOTE}\n\n" + (f"{skipped}\n\n" if skipped else "") + \
        "![probe](probe.png)\n"
    if "readback" in summary:
        report += f"\n## What each latent says\n\n{readback_table(summary['readback'])}\n\n{READBACK_NOTE}\n"
    return report


def plot_probe(summary: Mapping, path: Path) -> None:
    """Accuracy per condition with its interval, one panel per group, the as-trained accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: Sequence[Mapping] = summary["conditions"]
    trained, k = rows[0], summary["run"]["num_selected_patches"]
    groups = [g for g in PROBE_GROUPS if any(r["group"] == g for r in rows)]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(3.6 * max(len(groups), 1), 3.4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        members = [trained] + [r for r in rows if r["group"] == group]
        if group == "count":
            members = sorted(members, key=lambda r: r["n_latent"])
        elif group == "k":
            members = sorted(members, key=lambda r: r["num_selected_patches"] or k)
        labels = [_short(r, group, k) for r in members]
        values = [100 * r["accuracy"] for r in members]
        errors = [[100 * (r["accuracy"] - r["accuracy_ci95"][0]) for r in members],
                  [100 * (r["accuracy_ci95"][1] - r["accuracy"]) for r in members]]
        colours = ["tab:green" if r is trained else "tab:blue" for r in members]
        ax.bar(range(len(members)), values, yerr=errors, color=colours, capsize=3)
        ax.axhline(100 * trained["accuracy"], color="tab:green", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(members)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(GROUP_TITLES[group], fontsize=10)
        ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp")
    fig.savefig(temporary, format="png", dpi=110)
    plt.close(fig)
    temporary.replace(path)


def _short(row: Mapping, group: str, k: int) -> str:
    """The tick label: the as-trained bar is named by the group's own axis."""
    if row["group"] == "trained":
        return {"count": f"n={row['n_latent']}", "k": f"K={k}"}.get(group, "as trained")
    return row["name"]


def write_probe_outputs(summary: Mapping, out: Path) -> dict[str, Path]:
    """probe.json, probe.md and probe.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "probe.json", "markdown": out / "probe.md", "plot": out / "probe.png"}
    write_text_atomically(paths["json"], json.dumps(summary, indent=2) + "\n")
    write_text_atomically(paths["markdown"], markdown_report(summary))
    plot_probe(summary, paths["plot"])
    logger.info("wrote %s, %s and %s", *paths.values())
    return paths
