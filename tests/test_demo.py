"""``ivtlr demo --quick``: the whole pipeline (data, tiny model, trainer, checkpoints, eval harness, report) end to end,
and the report's numbers checked against the predictions the evaluation harness wrote."""
from __future__ import annotations

import json
import re
from dataclasses import asdict

import pytest
import yaml
from PIL import Image

from ivtlr import demo
from ivtlr.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def predictions(out, variant: str, split: str) -> list[dict]:
    path = out / "eval" / variant / f"predictions_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_report_has_every_variant_with_its_numbers(quick_report):
    out, report = quick_report
    assert list(report["variants"]) == list(demo.VARIANTS)
    assert report["quick"] is True and report["recipe"] == json.loads(json.dumps(asdict(demo.QUICK)))
    for variant, row in report["variants"].items():
        test = predictions(out, variant, "test")
        validation = predictions(out, variant, "validation")
        assert len(test) == demo.QUICK.n_test and len(validation) == demo.QUICK.n_val
        # Recomputed from the harness's own records: the report adds nothing and drops nothing.
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in test) / len(test))
        assert row["validation_accuracy"] == pytest.approx(sum(r["correct"] for r in validation) / len(validation))
        assert row["ar_steps"] == pytest.approx(sum(r["n_generated_tokens"] for r in test) / len(test))
        assert row["seconds_per_question"] == pytest.approx(sum(r["seconds"] for r in test) / len(test))
        assert 1 <= row["ar_steps"] <= demo.QUICK.max_new_tokens and row["seconds_per_question"] > 0
        assert row["train_seconds"] > 0
    assert set(report["targets"]) == {"ivtlr_accuracy_at_least_cot", "ivtlr_accuracy_at_least_nocot_plus_10_points",
                                      "ivtlr_ar_steps_at_most_a_fifth_of_cot"}


def test_latent_variants_answer_with_latent_steps_and_the_baselines_without(quick_report):
    out, report = quick_report
    for variant in demo.VARIANTS:
        summary = json.loads((out / "eval" / variant / "summary_test.json").read_text())
        expected = demo.QUICK.max_latent_stage if variant in demo.LATENT_VARIANTS else 0
        assert summary["run"]["n_latent"] == expected
        assert summary["run"]["num_selected_patches"] == (0 if variant == "latent_text_only"
                                                           else demo.QUICK.num_selected_patches)


def run_config(out, name: str) -> dict:
    return yaml.safe_load((out / "runs" / name / "config.yaml").read_text())


def test_runs_continue_from_the_shared_pretraining_and_stage0_checkpoints(quick_report):
    out, report = quick_report
    pretrain = run_config(out, demo.PRETRAIN_RUN)
    assert pretrain["mode"] == "cot" and pretrain["num_epochs"] == demo.QUICK.pretrain_epochs
    assert pretrain["load_model_path"] is None and "/data/reading/" in pretrain["dataset"]["data_files"]["train"]
    stage0 = run_config(out, demo.STAGE0_RUN)
    assert stage0["mode"] == "cot" and stage0["num_epochs"] == demo.QUICK.stage0_epochs
    assert "/data/reasoning/" in stage0["dataset"]["data_files"]["train"]
    assert f"/runs/{demo.PRETRAIN_RUN}/checkpoints/" in stage0["load_model_path"]
    for variant in ("cot", *demo.LATENT_VARIANTS):
        config = yaml.safe_load((out / "runs" / variant / "config.yaml").read_text())
        assert f"/runs/{demo.STAGE0_RUN}/checkpoints/" in config["load_model_path"]
        assert config["resume"] == demo.QUICK.epochs_per_stage and config["mode"] == variant
        metrics = [json.loads(line) for line in (out / "runs" / variant / "metrics.jsonl").read_text().splitlines()]
        assert sorted({m["stage"] for m in metrics}) == list(range(1, demo.QUICK.max_latent_stage + 1))
    nocot = run_config(out, "nocot")
    assert f"/runs/{demo.PRETRAIN_RUN}/checkpoints/" in nocot["load_model_path"]
    assert nocot["num_epochs"] == demo.QUICK.total_epochs and nocot["resume"] == 0


def test_report_gives_the_reading_accuracy_of_the_pretrained_model(quick_report):
    out, report = quick_report
    records = [json.loads(line) for line in
               (out / "eval" / demo.PRETRAIN_RUN / "predictions_validation.jsonl").read_text().splitlines() if line]
    assert len(records) == demo.QUICK.n_val and all(r["topic"] == "read_cell" for r in records)
    expected = sum(r["correct"] for r in records) / len(records)
    assert report["pretraining"]["reading_validation_accuracy"] == pytest.approx(expected)
    assert report["pretraining"]["train_seconds"] > 0


def test_markdown_table_matches_the_json(quick_report):
    out, report = quick_report
    markdown = (out / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == len(demo.VARIANTS)
    for line, (variant, row) in zip(rows, report["variants"].items()):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == demo.VARIANT_LABELS[variant]
        assert float(cells[1]) == pytest.approx(100 * row["accuracy"], abs=0.05)
        assert float(cells[3]) == pytest.approx(row["ar_steps"], abs=0.05)
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (out / picture).is_file()


def test_pictures_are_real_pngs(quick_report):
    out, report = quick_report
    with Image.open(out / report["files"]["training_curve"]) as curve:
        assert curve.format == "PNG" and curve.width >= 400
    assert len(report["files"]["explain"]) == demo.QUICK.n_explained
    for name in report["files"]["explain"]:
        with Image.open(out / name) as picture:
            # The 112 px image drawn at 3x, plus the legend strip.
            assert picture.format == "PNG" and picture.width >= 3 * demo.QUICK.image_size


def test_loss_curve_places_each_step_in_the_whole_schedule(tmp_path):
    lines = [{"step": s, "epoch": e, "loss": float(s)} for s, e in [(1, 2), (2, 2), (3, 3), (4, 3)]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    xs, ys = demo.read_loss_curve(tmp_path, first_epoch=5, resume_epoch=2)
    assert xs == [5.5, 6.0, 6.5, 7.0] and ys == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(("ivtlr", "expected"), [
    (dict(accuracy=0.60, ar_steps=8.0), [True, True, True]),
    (dict(accuracy=0.59, ar_steps=8.0), [False, True, True]),
    (dict(accuracy=0.60, ar_steps=8.1), [True, True, False]),
    (dict(accuracy=0.49, ar_steps=8.0), [False, False, True]),
])
def test_target_checks(ivtlr, expected):
    rows = {"ivtlr": ivtlr, "cot": dict(accuracy=0.60, ar_steps=40.0), "nocot": dict(accuracy=0.40, ar_steps=7.0)}
    assert list(demo.target_checks(rows).values()) == expected


def test_running_mean():
    assert demo.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert demo.running_mean([2.0, 4.0], 1) == [2.0, 4.0]
