"""``ivtlr demo --quick``: the whole pipeline (data, tiny model, trainer, checkpoints, eval harness, report) end to end,
and the report's numbers checked against the predictions the evaluation harness wrote."""
from __future__ import annotations

import json
import re
from dataclasses import asdict

import pytest
import yaml
from PIL import Image

from ivtlr.demo import report as demo_report
from ivtlr.demo import run as demo
from ivtlr.cli import main
from ivtlr.data.digits import compose_digit_puzzles
from ivtlr.evaluation.probe import plan_conditions

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--full", "--rl", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def predictions(out, variant: str, split: str) -> list[dict]:
    path = out / "eval" / variant / f"predictions_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_report_has_every_variant_with_its_numbers(quick_report):
    out, report = quick_report
    assert list(report["variants"]) == list(demo_report.VARIANTS)  # --full --rl: every variant
    assert set(demo_report.DEFAULT_VARIANTS) == {"nocot", "cot", "ivtlr", "ivtlr_supervised"}
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
        correct = sum(r["correct"] for r in test)
        assert row["accuracy_ci95"] == pytest.approx(list(demo_report.wilson_interval(correct, len(test))))
        assert row["accuracy_ci95"][0] <= row["accuracy"] <= row["accuracy_ci95"][1]
    assert set(report["targets"]) == set(demo_report.target_checks(report["variants"], report["probes"]))
    assert len(report["targets"]) == 11  # the supervised method's 9, RL's 2
    assert report["workers"] == 2 and report["cpu"]


def test_right_cell_rates_are_recounted_from_the_predictions_and_the_puzzles(quick_report):
    """Per latent step, the share of inserted patches inside the cell the written step reads: recounted here from the
    harness's records and the puzzles' own paths (2x2 cells of 2x2 tokens on a 4x4 token grid)."""
    out, report = quick_report
    recipe = demo.QUICK
    puzzles = compose_digit_puzzles(seed=0, n_train=recipe.n_train, n_val=recipe.n_val, n_test=recipe.n_test)
    path_of = {p.uid: p.path for p in puzzles["test"]}
    for variant in ("latent_vision_only_supervised", "ivtlr", "ivtlr_supervised"):
        records = predictions(out, variant, "test")
        looks = report["variants"][variant]["looked_at_right_cell"]
        assert [look["step"] for look in looks] == [1, 2, 3]
        for look in looks:
            shares = []
            for record in records:
                indices = record["selected"][look["step"] - 1]
                assert len(indices) == recipe.num_selected_patches
                cells = [(i // 4 // 2) * 2 + (i % 4) // 2 for i in indices]
                shares.append(sum(cell == path_of[record["id"]][look["step"] - 1] for cell in cells) / len(cells))
            assert look["rate"] == pytest.approx(sum(shares) / len(shares))
    # Chance for step 1 is 4 patches of 16; later steps draw from the patches left.
    assert report["variants"]["ivtlr"]["looked_at_right_cell"][0]["chance"] == pytest.approx(0.25)
    assert report["variants"]["latent_text_only_supervised"]["looked_at_right_cell"] == []
    assert report["variants"]["cot"]["looked_at_right_cell"] == []


def test_latent_variants_answer_with_latent_steps_and_the_baselines_without(quick_report):
    out, report = quick_report
    for variant in report["variants"]:
        summary = json.loads((out / "eval" / variant / "summary_test.json").read_text())
        expected = demo.QUICK.max_latent_stage if variant in demo_report.LATENT_VARIANTS else 0
        assert summary["run"]["n_latent"] == expected
        assert summary["run"]["num_selected_patches"] == (0 if demo_report.VARIANT_MODES[variant] == "latent_text_only"
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
    supervision = {"ivtlr_supervised": (1.0, 0.5), "latent_text_only_supervised": (1.0, 0.0),
                   "latent_vision_only_supervised": (0.0, 0.5)}
    for variant in [v for v in report["variants"] if v not in ("nocot", "ivtlr_rl")]:
        config = yaml.safe_load((out / "runs" / variant / "config.yaml").read_text())
        assert f"/runs/{demo.STAGE0_RUN}/checkpoints/" in config["load_model_path"]
        assert config["resume"] == demo.QUICK.epochs_per_stage and config["mode"] == demo_report.VARIANT_MODES[variant]
        assert (config["step_supervision"], config["region_supervision"]) == supervision.get(variant, (0.0, 0.0))
        metrics = [json.loads(line) for line in (out / "runs" / variant / "metrics.jsonl").read_text().splitlines()]
        assert sorted({m["stage"] for m in metrics}) == list(range(1, demo.QUICK.max_latent_stage + 1))
    nocot = run_config(out, "nocot")
    assert f"/runs/{demo.PRETRAIN_RUN}/checkpoints/" in nocot["load_model_path"]
    assert nocot["num_epochs"] == demo.QUICK.total_epochs and nocot["resume"] == 0


def test_rl_continues_from_the_supervised_checkpoint_and_draws_its_course(quick_report):
    out, report = quick_report
    config = run_config(out, "ivtlr_rl")
    assert config["load_model_path"] == report["checkpoints"]["ivtlr_supervised"]
    assert config["rl"]["steps"] == demo.QUICK.rl_steps and config["lr"] == demo.QUICK.rl_lr
    metrics = [json.loads(line) for line in (out / "runs" / "ivtlr_rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["rollout_step"] for m in metrics] == list(range(1, demo.QUICK.rl_steps + 1))
    assert all(0 <= m["accuracy"] <= 1 and m["latent_sigma"] > 0 for m in metrics)
    with Image.open(out / report["files"]["rl_curve"]) as curve:
        assert curve.format == "PNG"
    assert "rl_above_the_supervised_checkpoint" in report["targets"]


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
    markdown = (out / "report.md").read_text().split("## Do the latents matter?")[0]
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == len(report["variants"])
    for line, (variant, row) in zip(rows, report["variants"].items()):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == demo_report.VARIANT_LABELS[variant]
        assert float(cells[1]) == pytest.approx(100 * row["accuracy"], abs=0.051)
        assert float(cells[4]) == pytest.approx(row["ar_steps"], abs=0.051)
        looks = row["looked_at_right_cell"]
        assert cells[6] == (" / ".join(f"{s['step']}: {100 * s['rate']:.0f}" for s in looks) if looks else "-")
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
    xs, ys = demo_report.read_loss_curve(tmp_path / "metrics.jsonl", first_epoch=5, resume_epoch=2)
    assert xs == [5.5, 6.0, 6.5, 7.0] and ys == [1.0, 2.0, 3.0, 4.0]


def _rows(supervised: dict) -> dict:
    looks = [{"step": s, "rate": 0.9} for s in (1, 2, 3)]
    return {"ivtlr_supervised": {"looked_at_right_cell": looks, **supervised},
            "cot": dict(accuracy=0.84, ar_steps=28.0), "nocot": dict(accuracy=0.37, ar_steps=7.0),
            "latent_text_only_supervised": dict(accuracy=0.60), "latent_vision_only_supervised": dict(accuracy=0.50)}


def _probe(donor_changed: float, random_accuracy: float) -> dict:
    return {"conditions": [{"group": "trained", "text": "trained", "vision": "trained", "accuracy": 0.80},
                           {"group": "text", "text": "donor", "vision": "trained", "answers_changed": donor_changed,
                            "accuracy": 0.3},
                           {"group": "vision", "text": "trained", "vision": "random", "accuracy": random_accuracy,
                            "answers_changed": 0.2}]}


@pytest.mark.parametrize(("supervised", "probe", "failed"), [
    (dict(accuracy=0.80, ar_steps=7.0), _probe(0.7, 0.65), []),
    (dict(accuracy=0.749, ar_steps=7.0), _probe(0.7, 0.65), ["accuracy_at_least_75_percent"]),
    (dict(accuracy=0.73, ar_steps=7.0), _probe(0.7, 0.65),
     ["accuracy_at_least_75_percent", "at_least_cot_minus_10_points"]),
    (dict(accuracy=0.80, ar_steps=7.1), _probe(0.59, 0.71),
     ["ar_steps_at_most_a_quarter_of_cot", "donor_latents_change_60_percent_of_answers",
      "random_patches_cost_10_points"]),
    (dict(accuracy=0.59, ar_steps=7.0, looked_at_right_cell=[{"step": 1, "rate": 0.79}]), None,
     ["accuracy_at_least_75_percent", "at_least_nocot_plus_35_points", "at_least_cot_minus_10_points",
      "right_cell_at_least_80_percent_every_step", "above_latent_text_only_supervised"]),
])
def test_target_checks(supervised, probe, failed):
    checks = demo_report.target_checks(_rows(supervised), {"ivtlr_supervised": probe} if probe else None)
    assert sorted(name.removeprefix("supervised_ivtlr_") for name, met in checks.items() if not met) == sorted(failed)
    assert len(checks) == (9 if probe else 7)


def test_wilson_interval_matches_hand_computed_values():
    # 50 of 100: p=0.5, z=1.96: centre 0.5, half-width 1.96*sqrt(0.0025+0.000096)/1.0384 = 0.0962.
    low, high = demo_report.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert demo_report.wilson_interval(0, 10)[0] == 0.0 and demo_report.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert demo_report.wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)


def test_cell_of_token_on_grids_of_one_and_two_tokens_per_cell():
    assert [demo_report.cell_of_token(t, (2, 2), 2) for t in range(4)] == [0, 1, 2, 3]
    assert [demo_report.cell_of_token(t, (4, 4), 2) for t in range(16)] == [0, 0, 1, 1, 0, 0, 1, 1,
                                                                            2, 2, 3, 3, 2, 2, 3, 3]


def test_look_rates_count_patches_in_the_right_cell_and_chance_among_those_left():
    puzzle = compose_digit_puzzles(seed=0, n_train=1, n_val=1, n_test=1)["test"][0]
    first, second, third = puzzle.path
    cell_tokens = {cell: [t for t in range(16) if demo_report.cell_of_token(t, (4, 4), 2) == cell] for cell in range(4)}
    other = next(c for c in range(4) if c not in puzzle.path)
    record = {"id": puzzle.uid, "selected": [cell_tokens[first], cell_tokens[second][:2] + cell_tokens[other][:2],
                                             cell_tokens[other][2:] + cell_tokens[third][:2]]}
    looks = demo_report.look_rates([record], {puzzle.uid: puzzle}, (4, 4))
    assert [(look["step"], look["rate"]) for look in looks] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    # Step 2 draws from the 12 patches left (4 of them in its cell), step 3 from the 8 left (4 of them in its cell).
    assert [look["chance"] for look in looks] == pytest.approx([4 / 16, 4 / 12, 4 / 8])


def test_running_mean():
    assert demo_report.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert demo_report.running_mean([2.0, 4.0], 1) == [2.0, 4.0]


def test_report_probes_the_method_under_both_objectives(quick_report):
    """The "Do the latents matter?" section: every condition of ``ivtlr probe`` on the validation split, and what
    the latents read back as, for IVT-LR with and without supervision; their files."""
    out, report = quick_report
    n_latent, k = demo.QUICK.max_latent_stage, demo.QUICK.num_selected_patches
    assert list(report["probes"]) == list(demo_report.PROBED_VARIANTS)
    section = (out / "report.md").read_text().split("## Do the latents matter?")[1]
    for variant, probe in report["probes"].items():
        assert [row["name"] for row in probe["conditions"]] == [c.name for c in plan_conditions(n_latent, k)]
        assert probe["conditions"][0]["accuracy"] == \
            pytest.approx(report["variants"][variant]["validation_accuracy"])
        assert all(row["questions"] == demo.QUICK.n_val for row in probe["conditions"])
        assert [step["questions"] for step in probe["readback"]["steps"]] == [demo.QUICK.n_val] * n_latent
        assert {"probe.json", "probe.md", "probe.png"} <= {p.name for p in (out / "probe" / variant).iterdir()}
        assert f"### {demo_report.VARIANT_LABELS[variant]}" in section
        assert f"](probe/{variant}/probe.png)" in section
    assert "| as trained (n=3, K=4) |" in section and section.count("decodes to its written step") == 3
