"""lmms-eval, offline, through ``ivtlr serve``: its built-in ``openai`` model asks the served tiny checkpoint the
questions ``ivtlr eval`` answers (a task YAML that includes integrations/lmms_eval/_ivtlr_template_yaml and names the
run's config), and gets the same answers, text for text, so the same accuracy under every answer rule.

lmms-eval runs as its command line in a subprocess, as a user runs it (it also patches process-wide state: logging,
file locks), with the Hugging Face hub and datasets offline."""
from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ivtlr.cli import main
from ivtlr.config import ConfigError, load_config
from ivtlr.evaluation.answers import EXTRACTION_RULES, is_correct
from ivtlr.evaluation.cli import load_eval_examples
from ivtlr.evaluation.records import read_jsonl
from ivtlr.harness.questions import METRICS, doc_to_text, doc_to_visual, question_docs, score, task_config
from servers import MODEL_NAME, Server
from train_runs import REPO, subprocess_env

needs_lmms_eval = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                     reason="lmms-eval is not installed (docs/harnesses.md: installing it)")

TEMPLATE = REPO / "integrations" / "lmms_eval" / "_ivtlr_template_yaml"
TASK = "ivtlr_tiny_run"
#: A short answer budget for both sides: the answers are compared token for token, not for being complete.
OVERRIDES = ["eval.max_new_tokens=40"]


def write_task(directory: Path, config: Path) -> Path:
    """A task asking the questions of ``ivtlr eval CONFIG OVERRIDES``, everything else from the shipped template."""
    directory.mkdir(parents=True)
    overrides = ", ".join(json.dumps(override) for override in OVERRIDES)
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ninclude: {json.dumps(str(TEMPLATE))}\n"
        f"dataset_kwargs:\n  config: {json.dumps(str(config))}\n  overrides: [{overrides}]\n")
    return directory


def offline_env(home: Path) -> dict[str, str]:
    return {**subprocess_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(home / "hf"), "HF_DATASETS_CACHE": str(home / "hf" / "datasets"),
            "IVTLR_CACHE": str(home / "ivtlr"), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def lmms_eval_run(tiny_checkpoint, tmp_path_factory) -> tuple[dict, list[dict]]:
    """lmms-eval's results JSON and logged samples for the task, from the served checkpoint."""
    config, checkpoint = tiny_checkpoint
    root = tmp_path_factory.mktemp("lmms_eval")
    server = Server(config, checkpoint, root / "server.log")
    try:
        model_args = (f"model={MODEL_NAME},base_url={server.url}/v1,api_key=unused,max_retries=1,"
                      "num_concurrent=4")
        command = [sys.executable, "-m", "lmms_eval", "--model", "openai", "--model_args", model_args,
                   "--tasks", TASK, "--include_path", str(write_task(root / "tasks", config)),
                   "--output_path", str(root / "out"), "--log_samples", "--verbosity", "WARNING"]
        done = subprocess.run(command, env=offline_env(root), cwd=root, capture_output=True, text=True, timeout=300)
    finally:
        assert server.stop()
    said = f"lmms-eval said:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert done.returncode == 0, said
    results, samples = list(root.rglob("*_results.json")), list(root.rglob(f"*_samples_{TASK}.jsonl"))
    assert len(results) == len(samples) == 1, said
    results, samples = results[0], samples[0]
    return json.loads(results.read_text()), read_jsonl(samples)


@pytest.fixture(scope="module")
def ivtlr_eval_run(tiny_checkpoint, tmp_path_factory) -> tuple[dict, list[dict]]:
    """``ivtlr eval``'s summary and predictions for the same config and checkpoint, in this process."""
    config, checkpoint = tiny_checkpoint
    out = tmp_path_factory.mktemp("ivtlr_eval")
    assert main(["eval", str(config), *OVERRIDES, "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    (predictions,) = out.glob("predictions_*.jsonl")
    (summary,) = out.glob("summary_*.json")
    return json.loads(summary.read_text()), read_jsonl(predictions)


@pytest.fixture(scope="module")
def docs(tiny_checkpoint):
    """The documents the tasks build for the run's config (the function the shipped task class calls)."""
    return question_docs(task_config(None, "test", {"config": str(tiny_checkpoint[0]), "overrides": OVERRIDES}))


@needs_lmms_eval
def test_lmms_eval_answers_exactly_what_ivtlr_eval_answers(lmms_eval_run, ivtlr_eval_run, docs):
    """Each question gets the same prompt (as lmms-eval logs what it sent) and the same answer, token for token
    (lmms-eval logs and scores the answer with surrounding whitespace stripped), so every rule scores the same."""
    (results, samples), (summary, predictions) = lmms_eval_run, ivtlr_eval_run
    expected = {record["id"]: record for record in predictions}
    assert len(expected) == summary["overall"]["count"] == len(samples) >= 4
    assert sorted(docs["id"][sample["doc_id"]] for sample in samples) == sorted(expected)
    for sample in samples:
        record = expected[docs["id"][sample["doc_id"]]]
        prompt, text = record["messages"]
        assert sample["input"] == prompt
        assert "LMMS_EVAL_REQUEST_FAILED" not in sample["filtered_resps"], sample["filtered_resps"]
        assert sample["filtered_resps"] == text.strip(), f"{record['id']}: ivtlr eval answered {text!r}"
        for rule in EXTRACTION_RULES:
            assert sample[METRICS[rule]] == float(is_correct(prompt, text, record["choices"], record["answer"], rule))
    metrics = results["results"][TASK]
    for rule in EXTRACTION_RULES:
        assert metrics[f"{METRICS[rule]},none"] == pytest.approx(summary["accuracy_by_rule"][rule]), rule
    assert metrics[f"{METRICS['original']},none"] == pytest.approx(summary["overall"]["accuracy"])


def test_the_tasks_ask_what_ivtlr_eval_asks(tiny_checkpoint, ivtlr_eval_run, docs):
    """Without lmms-eval: the tasks' documents are ivtlr eval's questions, in its order, with the prompt text it
    records and the very pixels it reads."""
    config, _ = tiny_checkpoint
    examples = load_eval_examples(load_config(config, OVERRIDES))
    predictions = ivtlr_eval_run[1]
    assert docs["id"] == [record["id"] for record in predictions] == [example.id for example in examples]
    for doc, record, example in zip(docs, predictions, examples):
        assert doc_to_text(doc) == record["messages"][0]
        (image,) = doc_to_visual(doc)
        assert np.array_equal(np.asarray(image), np.asarray(example.image))
        assert score(doc, record["messages"][-1]) == {METRICS[rule]: float(is_correct(
            record["messages"][0], record["messages"][-1], record["choices"], record["answer"], rule))
            for rule in EXTRACTION_RULES}


def test_a_task_names_its_questions_as_a_dataset_section_does(tmp_path):
    config = task_config("m3cot", "validation", {"data_files": {"validation": "v.parquet"}, "use_context": True})
    assert (config.dataset.source, config.dataset.eval_split, config.dataset.use_context) == ("m3cot", "validation",
                                                                                             True)
    with pytest.raises(ConfigError, match="unknown dataset options"):
        task_config("m3cot", "test", {"data_file": "t.parquet"})
    with pytest.raises(ConfigError, match="only `overrides`"):
        task_config(None, "test", {"config": str(tmp_path / "c.yaml"), "limit": 3})
    with pytest.raises(ConfigError, match="source"):
        task_config(None, "test", {})


def shipped_task(name: str) -> dict:
    """A shipped task YAML with its include resolved, ``!function`` tags read as the dotted names they import."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))
    folder = TEMPLATE.parent
    task = yaml.load((folder / name).read_text(), Loader=Loader)
    return {**yaml.load((folder / task.pop("include")).read_text(), Loader=Loader), **task}


@pytest.mark.parametrize("name, source", [("ivtlr_digits.yaml", "digits"), ("ivtlr_m3cot.yaml", "LightChen2333/M3CoT")])
def test_the_shipped_tasks_name_ivtlr_code(name, source):
    """Without lmms-eval: each shipped task is the template's class and functions on its source's test split, and
    every ``!function`` it names exists (the task class only where lmms-eval is installed)."""
    task = shipped_task(name)
    assert (task["task"], task["dataset_path"], task["test_split"]) == (name.removesuffix(".yaml"), source, "test")
    assert [metric["metric"] for metric in task["metric_list"]] == [METRICS[rule] for rule in EXTRACTION_RULES]
    assert task["generation_kwargs"] == {"max_new_tokens": 512, "temperature": 0}
    targets = [value[1] for value in task.values() if isinstance(value, tuple)]
    assert task["class"] == ("!function", "ivtlr.harness.lmms_task.IvtlrQuestionsTask") and len(targets) == 5
    for target in targets:
        module, attribute = target.rsplit(".", 1)
        if module != "ivtlr.harness.lmms_task" or importlib.util.find_spec("lmms_eval") is not None:
            assert callable(getattr(importlib.import_module(module), attribute)), target
    assert task_config(source, "test", task.get("dataset_kwargs")).dataset.eval_split == "test"
