"""``ivtlr eval``: the command end to end on schema files, the JSONL and summary it writes, resuming, baselines."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from fixture_processor import IMAGE_SIZE, QWEN_FIXTURE, base_with_processor
from ivtlr import IVTLR
from ivtlr.checkpoint import latest_checkpoint
from ivtlr.loading import load_checkpoint
from ivtlr.cli import main
from ivtlr.config import Config
from ivtlr.data import build_generation_batch, format_prompt_text, load_examples
from ivtlr.loading import load_config_model
from ivtlr.backbones import load_processor
from ivtlr.evaluation.records import read_jsonl
from schema_files import m3cot_rows, scienceqa_rows, write_m3cot_files, write_rows, write_scienceqa_files
from train_runs import train_in_process
from train_runs import write_config as write_training_config

ORIGINAL_FIELDS = {"id", "choices", "answer", "domain", "topic", "messages"}
OUR_FIELDS = {"prediction", "correct", "n_generated_tokens", "seconds"}
TINY = {"model": "tiny:qwen2_vl", "image_size": 56, "num_selected_patches": 2,
        "eval": {"batch_size": 2, "max_new_tokens": 5, "n_latent": 2}}


def write_config(tmp_path: Path, data_files: dict, dataset: dict | None = None, **settings) -> Path:
    files = {split: str(path) for split, path in data_files.items()}
    config = {"dataset": {"source": "auto", **(dataset or {}), "data_files": files}, **settings}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_eval(config: Path, out: Path, *extra: str) -> tuple[list[dict], dict]:
    assert main(["eval", str(config), *extra, "--out", str(out), "--no-progress"]) == 0
    (predictions,) = out.glob("predictions_*.jsonl")
    (summary,) = out.glob("summary_*.json")
    return read_jsonl(predictions), json.loads(summary.read_text())


def decode(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)


@pytest.mark.skipif(not QWEN_FIXTURE.is_dir(), reason="original-code fixtures not found")
def test_original_checkpoint_end_to_end(tmp_path, capsys):
    """--original/--base: the fixture's released-format checkpoint answers a schema file's test split, batched;
    each answer is what the checkpoint generates for that question alone."""
    base = base_with_processor(tmp_path / "base")
    state = QWEN_FIXTURE / "ivtlr_state.pth"
    files = write_m3cot_files(tmp_path / "data", n_train=1, n_test=5)
    config = write_config(tmp_path, files, model="unused-with-original", image_size=IMAGE_SIZE,
                          num_selected_patches=4, eval={"batch_size": 2, "max_new_tokens": 6, "n_latent": 3})
    records, summary = run_eval(config, tmp_path / "out", "--original", str(state), "--base", str(base))

    rows = m3cot_rows("test", 5)
    assert [r["id"] for r in records] == [row["id"] for row in rows]
    engine = IVTLR.from_original(base, state, num_selected_patches=4)
    processor = load_processor(str(base), "qwen2_vl")
    for record, example in zip(records, load_examples("m3cot", "test", data_files=files)):
        assert ORIGINAL_FIELDS | OUR_FIELDS <= record.keys()
        assert (record["choices"], record["answer"]) == (example.choices, example.answer)
        assert (record["domain"], record["topic"]) == ("science", "handwriting")
        assert record["messages"][0] == format_prompt_text(example.question, example.choices)
        batch = build_generation_batch(processor, [example], 3, engine.latent_token_id, image_size=IMAGE_SIZE)
        alone = engine.generate(**batch, max_new_tokens=6, return_dict=True)
        assert record["messages"][1] == decode(processor.tokenizer, alone.sequences[0, : alone.lengths[0]])
        assert record["n_generated_tokens"] == int(alone.lengths[0])
        assert record["correct"] == (record["prediction"] == record["answer"])
    assert summary["run"]["n_latent"] == 3 and summary["run"]["num_selected_patches"] == 4
    assert summary["overall"]["count"] == 5
    assert "| overall | all | 5 |" in capsys.readouterr().out


def earlier_record(record_id: str, gold: str, letter: str, **groups: str) -> dict:
    """A record as an earlier, interrupted run would have written it, answering ``letter``."""
    return {"id": record_id, "choices": ["w", "x", "y", "z"], "answer": gold,
            "messages": ["q", f"Therefore, the answer is {letter}"], "prediction": letter, "correct": letter == gold,
            "n_generated_tokens": 7, "seconds": 0.5, "domain": "", "topic": "", **groups}


def test_resume_skips_written_ids_and_redoes_a_torn_line(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=1, n_test=5)
    config = write_config(tmp_path, files, **TINY)
    out = tmp_path / "out"
    run_eval(config, out)  # a first run records what produces the answers; its answers are then replaced
    rows = m3cot_rows("test", 5)
    earlier = [earlier_record(rows[3]["id"], rows[3]["answer"], "B"),  # a wrong answer
               earlier_record(rows[0]["id"], rows[0]["answer"], "A")]  # a right one
    predictions = out / "predictions_untrained_test_ivtlr_latent2.jsonl"
    assert predictions.exists()
    # a crash in the middle of writing row 1
    torn = json.dumps(earlier_record(rows[1]["id"], rows[1]["answer"], "C"))[:40]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in earlier) + torn)

    records, summary = run_eval(config, out)
    assert records[:2] == earlier
    assert sorted(r["id"] for r in records[2:]) == sorted(rows[i]["id"] for i in (1, 2, 4))
    assert len(records) == summary["overall"]["count"] == 5
    assert summary["overall"]["correct"] == sum(r["correct"] for r in records)
    # Every answer rule re-scores the same records; the configured one comes first and equals the overall accuracy.
    assert list(summary["accuracy_by_rule"]) == ["original", "m3cot", "ivtlr_loose"]
    assert summary["accuracy_by_rule"]["original"] == summary["overall"]["accuracy"]
    content = predictions.read_bytes()
    run_eval(config, out)  # everything answered: nothing is generated or written
    assert predictions.read_bytes() == content


def test_scienceqa_groups_partition_the_questions(tmp_path):
    """Per subject / grade / context type, counts and correct answers add up to the overall ones."""
    files = write_scienceqa_files(tmp_path / "data", n_train=1, n_test=6, n_text_only=3)
    config = write_config(tmp_path, files, dataset={"source": "scienceqa", "keep_no_image": True}, **TINY)
    rows = scienceqa_rows("test", 6, n_text_only=3)
    out = tmp_path / "out"
    run_eval(config, out)  # records what produces the answers; its answers are then replaced by hand-made ones
    answered = [earlier_record(f"test-{i}", "ABCD"[rows[i]["answer"]], letter, subject=rows[i]["subject"],
                               grade=rows[i]["grade"], context_type="image" if rows[i]["image"] else "text")
                for i, letter in ((0, "A"), (1, "C"), (6, "C"))]  # right, wrong, right
    predictions = out / "predictions_untrained_test_ivtlr_latent2.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in answered))

    records, summary = run_eval(config, out)
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(rows) == summary["overall"]["count"]
    expected_keys = {"subject": lambda row: row["subject"], "grade": lambda row: row["grade"],
                     "context_type": lambda row: "image" if row["image"] is not None else "text"}
    overall = summary["overall"]
    for key, value_of in expected_keys.items():
        groups = summary["groups"][key]
        assert sum(g["count"] for g in groups.values()) == overall["count"]
        assert sum(g["correct"] for g in groups.values()) == overall["correct"]
        for value, stats in groups.items():
            members = [f"test-{i}" for i, row in enumerate(rows) if value_of(row) == value]
            assert stats["count"] == len(members), (key, value)
            assert stats["correct"] == sum(by_id[i]["correct"] for i in members), (key, value)
    assert set(summary["groups"]["context_type"]) == {"image", "text"}
    assert overall["correct"] >= 1  # the earlier records answer some questions right


@pytest.mark.parametrize(("mode", "n_latent", "patches"), [
    ("nocot", 0, 2), ("cot", 0, 2), ("latent_text_only", 2, 0), ("latent_vision_only", 2, 2), ("ivtlr", 2, 2)])
def test_modes_set_latents_and_patches(tmp_path, mode, n_latent, patches):
    """The paper's baselines and ablations in one harness: No-CoT / CoT answer with no latent step whatever
    eval.n_latent says; the answers are the engine's own generation for that many latents."""
    files = write_m3cot_files(tmp_path / "data", n_train=1, n_test=2)
    config_path = write_config(tmp_path, files, **TINY, mode=mode)
    records, summary = run_eval(config_path, tmp_path / "out")
    assert (summary["run"]["mode"], summary["run"]["n_latent"]) == (mode, n_latent)
    assert summary["run"]["num_selected_patches"] == patches

    model = load_config_model(Config.from_dict({**TINY, "mode": mode}), torch.device("cpu"))
    assert model.engine.latent_text == (mode != "latent_vision_only")
    examples = list(load_examples("m3cot", "test", data_files=files))
    batch = build_generation_batch(model.processor, examples, n_latent, model.engine.latent_token_id, image_size=56)
    out = model.engine.generate(**batch, max_new_tokens=5, return_dict=True)
    assert [len(s) for s in out.selected] == [n_latent] * len(examples)
    for b, record in enumerate(records):
        assert record["messages"][1] == decode(model.tokenizer, out.sequences[b, : out.lengths[b]])


def test_checkpoint_answers_with_its_final_stage(tmp_path, caplog):
    """--checkpoint: the training config evaluates the run's checkpoint with the latent steps of its last stage; a
    config naming another model is announced (the checkpoint's own base is what answers)."""
    files = write_m3cot_files(tmp_path / "data", n_train=4, n_test=3)
    config = write_training_config(tmp_path, files, num_epochs=2)  # stages 0 and 1
    checkpoint = latest_checkpoint(train_in_process(config) / "checkpoints")
    out = tmp_path / "eval"
    records, summary = run_eval(config, out, "eval.max_new_tokens=5", "eval.batch_size=2", "--checkpoint",
                                str(checkpoint))

    engine, components, meta = load_checkpoint(checkpoint)
    assert (meta.n_latent, meta.mode) == (1, "ivtlr")
    assert (summary["run"]["n_latent"], summary["run"]["mode"]) == (meta.n_latent, meta.mode)
    assert next(out.glob("predictions_*.jsonl")).name == f"predictions_{checkpoint.name}_test_ivtlr_latent1.jsonl"
    examples = list(load_examples("m3cot", "test", data_files=files))
    batch = build_generation_batch(components.processor, examples, 1, engine.latent_token_id,
                                   image_size=meta.image_size)
    generated = engine.generate(**batch, max_new_tokens=5, return_dict=True)
    assert [r["messages"][1] for r in records] == [
        decode(components.tokenizer, generated.sequences[b, : generated.lengths[b]]) for b in range(len(examples))]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        other, _ = run_eval(config, tmp_path / "other", "model=tiny:chameleon", "eval.max_new_tokens=5",
                            "--checkpoint", str(checkpoint))
    assert [r["messages"][1] for r in other] == [r["messages"][1] for r in records]
    (warning,) = [r.getMessage() for r in caplog.records if "not the config's model" in r.getMessage()]
    assert "trained from tiny:qwen2_vl, not the config's model tiny:chameleon" in warning


def test_more_latent_steps_than_trained_are_announced(caplog):
    """Asking for more latent steps than the checkpoint's final stage runs them (how accuracy extrapolates is a fair
    question) but says the extra ones are untrained."""
    model = load_config_model(Config(model="tiny:qwen2_vl", image_size=56), torch.device("cpu"))
    trained_with_three = dataclasses.replace(model, trained_n_latent=3)
    with caplog.at_level(logging.WARNING):
        assert trained_with_three.n_latent(3) == 3
        assert not caplog.records
        assert trained_with_three.n_latent(50) == 50
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "50 latent steps requested" in warning and "trained with at most 3" in warning


def test_no_usable_question_is_an_error_before_any_model_loads(tmp_path, capsys):
    """Every test row lacks its image (skipped): exit 2 with one line, and the model (a hub id that cannot be reached
    here) is never loaded, so the data is checked first."""
    rows = m3cot_rows("test", 2)
    for row in rows:
        row["image"] = None
    files = {"train": write_rows(tmp_path / "data", "train", m3cot_rows("train", 1), "m3cot", "jsonl"),
             "test": write_rows(tmp_path / "data", "test", rows, "m3cot", "jsonl")}
    config = write_config(tmp_path, files, model="no-such-org/no-such-model")
    assert main(["eval", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no usable questions in auto split 'test'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
