"""The demo's explain pictures: for a few test questions, the image cells each latent step of a trained model
inserted, each step labelled with the cell its written counterpart reads and what its latent state decodes to.
(The training curves are drawn by ``ivtlr.demo.report``.)"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ivtlr.data import load_examples
from ivtlr.data.digits import DigitPuzzle
from ivtlr.evaluation.explain import save_selection_png
from ivtlr.evaluation.infer import answer_question
from ivtlr.loading import load

#: Outline colours of latent steps 1, 2, 3 that no digit cell has (the cells are red, green, blue, yellow).
EXPLAIN_STEP_COLORS = ("black", "magenta", "cyan")


def explain_questions(checkpoint: Path, data_files: Mapping[str, str], puzzles: Mapping[str, DigitPuzzle],
                      count: int, out_dir: Path) -> list[Path]:
    """Draw, for the first ``count`` questions of the test split of ``data_files`` (M3CoT-schema parquet), the image
    cells each latent step of the model inserted, each step labelled with the cell its written counterpart reads
    (from ``puzzles``, by question id) and what its latent state decodes to; returns the PNG paths."""
    model = load(checkpoint, device="cpu")
    examples = load_examples("m3cot", "test", data_files=data_files, limit=count)
    paths = []
    for example in examples:
        puzzle = puzzles[example.id]
        result = answer_question(model, example.image, example.question, example.choices, read_back=True)
        said = result.latent_texts or []
        labels = [f"step {step + 1}: reads {puzzle.colours[cell]} ({puzzle.digits[cell]})"
                  + (f"; says \"{said[step]}\"" if step < len(said) else "")
                  for step, cell in enumerate(puzzle.path)]
        title = f"{example.question} answered {result.answer or '-'}, gold {example.answer}"
        path = out_dir / f"{example.id}.png"
        save_selection_png(path, result.seen_image, result.grid_hw, result.selected, scale=3, title=title,
                           step_colors=EXPLAIN_STEP_COLORS, step_labels=labels)
        paths.append(path)
    return paths
