"""``ivtlr probe``: its as-trained condition is plain ``ivtlr eval``, its results do not depend on the batch size, and
the command writes its table, JSON and plot (or refuses a model without latent steps in one line)."""
from __future__ import annotations

import json

import pytest
import torch

from ivtlr.cli import main
from ivtlr.config import load_config
from ivtlr.data import load_examples
from ivtlr.data.curriculum import split_rationale
from ivtlr.loading import load_config_model
from ivtlr.evaluation.probe import PROBE_GROUPS, plan_conditions, run_probe
from ivtlr.evaluation.records import read_jsonl
from ivtlr.evaluation.probe_report import plot_probe
from ivtlr.evaluation.records import wilson_interval
from schema_files import write_m3cot_files
from test_eval import TINY, run_eval, write_config

N_QUESTIONS = 5


@pytest.fixture
def config(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=1, n_test=N_QUESTIONS)
    return write_config(tmp_path, files, **TINY)


def test_plan_covers_every_group_once_with_the_trained_point_first():
    conditions = plan_conditions(3, 8, PROBE_GROUPS)
    first = conditions[0]
    assert first.group == "trained" and (first.n_latent, first.num_selected_patches) == (3, None)
    assert [c.n_latent for c in conditions if c.group == "count"] == [0, 1, 2]
    assert [c.num_selected_patches for c in conditions if c.group == "k"] == [2, 4, 16]
    assert [c.text for c in conditions if c.group == "text"] == ["zeros", "noise", "donor", "token"]
    assert [c.vision for c in conditions if c.group == "vision"] == ["random", "least", "none", "donor"]
    assert all(c.text == "trained" for c in conditions if c.group != "text")
    assert {c.group for c in plan_conditions(2, 0)} == {"trained", "count", "text"}  # K = 0: no vision to probe
    with pytest.raises(ValueError, match="needs latent steps"):
        plan_conditions(0, 4)
    with pytest.raises(ValueError, match="unknown probe condition"):
        plan_conditions(2, 4, ["count", "shuffle"])


def test_as_trained_is_plain_eval_prediction_for_prediction(config, tmp_path, capsys):
    records, summary = run_eval(config, tmp_path / "eval")
    assert main(["probe", str(config), "--out", str(tmp_path / "probe"), "--no-progress"]) == 0
    answers = [a for a in read_jsonl(tmp_path / "probe" / "probe_answers.jsonl") if a["group"] == "trained"]
    assert [a["id"] for a in answers] == [r["id"] for r in records]
    for answer, record in zip(answers, records):
        assert answer["text"] == record["messages"][1]
        assert (answer["prediction"], answer["correct"]) == (record["prediction"], record["correct"])
        assert answer["n_generated_tokens"] == record["n_generated_tokens"]
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probe["conditions"][0]["accuracy"] == pytest.approx(summary["overall"]["accuracy"])
    assert len(probe["conditions"]) == len(plan_conditions(2, 2))
    for row in probe["conditions"]:
        assert row["questions"] == N_QUESTIONS and 0 <= row["accuracy_ci95"][0] <= row["accuracy_ci95"][1] <= 1
        assert 0 <= row["attention_on_latents"] <= 1 and 0 <= row["attention_on_patches"] <= 1
    zero = next(row for row in probe["conditions"] if row["n_latent"] == 0)
    assert zero["attention_on_latents"] == 0 and zero["attention_on_patches"] == 0
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 0
    markdown = (tmp_path / "probe" / "probe.md").read_text()
    assert "| as trained (n=2, K=2) |" in markdown and "another question's latents" in markdown
    assert "| as trained (n=2, K=2) |" in capsys.readouterr().out


def test_results_do_not_depend_on_the_batch_size(config):
    loaded = load_config(config)
    model = load_config_model(loaded, torch.device("cpu"), torch.float32)
    examples = list(load_examples("m3cot", "test", data_files=loaded.dataset.data_files))
    conditions = plan_conditions(2, model.engine.num_selected_patches)
    kwargs = dict(max_new_tokens=5, image_size=loaded.image_size, seed=3, progress=False)
    by_two = run_probe(model, examples, conditions, batch_size=2, **kwargs)
    all_at_once = run_probe(model, examples, conditions, batch_size=N_QUESTIONS, **kwargs)
    for small, large in zip(by_two, all_at_once):
        assert small.condition == large.condition
        assert small.texts == large.texts, small.condition.name
        assert small.n_tokens == large.n_tokens
        for (a, b), (c, d) in zip(small.attention, large.attention):
            assert a == pytest.approx(c, abs=1e-5) and b == pytest.approx(d, abs=1e-5)


def test_a_model_without_latent_steps_is_refused_in_one_line(config, capsys):
    assert main(["probe", str(config), "mode=nocot", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: the probe needs latent steps" in err and "Traceback" not in err


def test_read_latents_reports_each_step_against_the_written_one(config, tmp_path):
    assert main(["probe", str(config), "--out", str(tmp_path / "probe"), "--no-progress", "--conditions", "count",
                 "--read-latents"]) == 0
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    steps = probe["readback"]["steps"]
    examples = list(load_examples("m3cot", "test", data_files=load_config(config).dataset.data_files))
    assert [entry["step"] for entry in steps] == [1, 2]
    for entry in steps:
        assert entry["questions"] == N_QUESTIONS and 0 <= entry["matched"] <= N_QUESTIONS
        assert entry["match_rate"] == pytest.approx(entry["matched"] / N_QUESTIONS)
        written = [e for e in entry["examples"]]
        assert all(w["written"] for w in written) and len(written) == min(5, N_QUESTIONS)
    first = steps[0]["examples"][0]
    assert first["id"] == examples[0].id and first["written"] == split_rationale(examples[0].rationale)[0].strip()
    assert "What each latent says" in (tmp_path / "probe" / "probe.md").read_text()


def test_a_condition_the_family_cannot_run_is_skipped_and_reported(tmp_path, capsys):
    """Qwen3-VL adds per-row deepstack features inside its decoder, which a row read from another image would lack:
    the default probe runs every other condition and says which one it skipped, and why."""
    files = write_m3cot_files(tmp_path / "data", n_train=1, n_test=2)
    config = write_config(tmp_path, files, **{**TINY, "model": "tiny:qwen3_vl", "image_size": 64})
    assert main(["probe", str(config), "--out", str(tmp_path / "probe"), "--no-progress"]) == 0
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    names = [row["name"] for row in probe["conditions"]]
    assert "same indices, another image" not in names
    assert names == [c.name for c in plan_conditions(2, 2, image_donors=False)]
    assert "another question's latents" in names and "K random patches" in names
    (skipped,) = probe["skipped"]
    assert (skipped["group"], skipped["name"]) == ("vision", "same indices, another image")
    assert "per-row visual features" in skipped["reason"]
    assert "Skipped: same indices, another image" in (tmp_path / "probe" / "probe.md").read_text()
    assert "Skipped: same indices, another image" in capsys.readouterr().out


def test_the_plot_draws_conditions_no_question_or_every_question_got_right(tmp_path):
    """An interval must hold its own point: at 0 or n correct, float rounding left Wilson's bound a hair inside and
    matplotlib refused the negative error bar, after the whole probe had run."""
    def row(group: str, name: str, correct: int) -> dict:
        return {"group": group, "name": name, "n_latent": 3, "num_selected_patches": 4, "accuracy": correct / 300,
                "accuracy_ci95": list(wilson_interval(correct, 300))}

    summary = {"run": {"num_selected_patches": 4},
               "conditions": [row("trained", "as trained", 150), row("text", "zeros", 0),
                              row("vision", "K random patches", 300)]}
    plot_probe(summary, tmp_path / "probe.png")
    assert (tmp_path / "probe.png").stat().st_size > 0
