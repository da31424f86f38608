"""``accelerate launch -m ivtlr eval``: N processes share the questions out and the merged predictions are a
one-process run's; an interrupted sharded run resumes (with the same or another number of processes) without
answering again what its parts hold."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate import PartialState
from schema_files import write_m3cot_files
from train_runs import REPO, one_thread, subprocess_env, train_in_process, write_config

from ivtlr.checkpoint import latest_checkpoint
from ivtlr.cli import main
from ivtlr.evaluation.records import read_jsonl
from ivtlr.evaluation.sharding import merge_parts, part_files, part_path, share_of

N_TEST = 6
EVAL = ("eval.batch_size=2", "eval.max_new_tokens=5")
#: What a process answered and how; timing (``seconds``) is the one field that differs between runs.
ANSWER_FIELDS = ("id", "choices", "answer", "messages", "prediction", "correct", "n_generated_tokens", "selected",
                 "domain", "topic")
#: ``seconds`` written into the records an interrupted run left, to tell them from answers generated again.
KEPT = 1234.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(config, checkpoint) of a tiny run of two stages (its checkpoint answers with one latent step); its test split
    has N_TEST questions."""
    directory = tmp_path_factory.mktemp("sharded")
    files = write_m3cot_files(directory / "data", n_train=2, n_test=N_TEST)
    config = write_config(directory, files, num_epochs=2)
    with one_thread():
        checkpoint = latest_checkpoint(train_in_process(config) / "checkpoints")
    return config, checkpoint


@pytest.fixture(scope="module")
def one_process(trained, tmp_path_factory) -> tuple[list[dict], dict]:
    """The predictions and summary of a plain one-process ``ivtlr eval`` (in this process, on one thread, as each
    launched process runs)."""
    out = tmp_path_factory.mktemp("one")
    eval_in_process(*trained, out)
    return outputs(out)


def eval_in_process(config: Path, checkpoint: Path, out: Path) -> None:
    """A plain ``ivtlr eval`` in this process, on one thread as each launched process runs."""
    with one_thread():
        assert main(["eval", str(config), *EVAL, "--checkpoint", str(checkpoint), "--out", str(out),
                     "--no-progress"]) == 0


def outputs(out: Path) -> tuple[list[dict], dict]:
    """The predictions and summary in ``out``, which holds nothing else of an evaluation (no part, no temporary)."""
    (predictions,) = out.glob("predictions_*.jsonl")
    (summary,) = out.glob("summary_*.json")
    assert not part_files(predictions) and not list(out.glob(".*.tmp"))
    return read_jsonl(predictions), json.loads(summary.read_text())


def launch_eval(config: Path, checkpoint: Path, out: Path, *extra: str, processes: int = 2
                ) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/cpu_ddp.yaml --num_processes N -m ivtlr eval ...``: N
    CPU processes (gloo), one thread each. (``accelerate launch --cpu`` starts N processes only through mpirun.)"""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", str(processes),
               "-m", "ivtlr", "eval", str(config), *EVAL, "--checkpoint", str(checkpoint), "--out", str(out),
               "--no-progress", *extra]
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def answers(records: list[dict]) -> list[tuple]:
    return [tuple(record[key] for key in ANSWER_FIELDS) for record in records]


def assert_same_evaluation(sharded: tuple[list[dict], dict], single: tuple[list[dict], dict]) -> None:
    """Every record answers as the one-process run's, in the same order; the summaries' numbers agree but for
    timing."""
    (records, summary), (expected, expected_summary) = sharded, single
    assert answers(records) == answers(expected)
    for key in ("count", "correct", "unanswered", "accuracy", "avg_generated_tokens"):
        assert summary["overall"][key] == expected_summary["overall"][key], key
    assert summary["accuracy_by_rule"] == expected_summary["accuracy_by_rule"]
    assert {key: {value: stats["correct"] for value, stats in groups.items()}
            for key, groups in summary["groups"].items()} == {
        key: {value: stats["correct"] for value, stats in groups.items()}
        for key, groups in expected_summary["groups"].items()}
    same_run = {key: value for key, value in summary["run"].items() if key not in ("wall_seconds_this_run",
                                                                                   "processes", "predictions")}
    assert same_run == {key: value for key, value in expected_summary["run"].items()
                        if key not in ("wall_seconds_this_run", "predictions")}


def interrupt(out: Path, parts: dict[int, list[int]], torn: int | None = None) -> Path:
    """Leave ``out`` as a two-process run stopped part-way would: no merged file, part ``i`` holding the records of
    questions ``parts[i]`` (their seconds set to KEPT), the first one ``torn`` then cut in the middle of its line."""
    (predictions,) = out.glob("predictions_*.jsonl")
    records = read_jsonl(predictions)
    predictions.unlink()
    for index, questions in parts.items():
        lines = [json.dumps({**records[question], "seconds": KEPT}) + "\n" for question in questions]
        if index == 0 and torn is not None:
            lines.append(json.dumps(records[torn])[:50])
        part_path(predictions, index, 2).write_text("".join(lines))
    return predictions


@pytest.fixture(scope="module")
def two_processes(trained, tmp_path_factory) -> tuple[Path, str]:
    """The output folder of a two-process ``ivtlr eval`` and its log."""
    config, checkpoint = trained
    out = tmp_path_factory.mktemp("two") / "eval"
    launched = launch_eval(config, checkpoint, out)
    assert launched.returncode == 0, launched.stderr[-4000:]
    return out, launched.stderr


def copy_of(two_processes: tuple[Path, str], tmp_path: Path) -> Path:
    out = tmp_path / "eval"
    shutil.copytree(two_processes[0], out)
    return out


def test_two_processes_answer_as_one(two_processes, one_process):
    out, log = two_processes
    sharded = outputs(out)
    assert_same_evaluation(sharded, one_process)
    assert sharded[1]["run"]["processes"] == 2 and sharded[1]["run"]["n_latent"] == 1
    assert all(len(record["selected"]) == 1 for record in sharded[0])  # the latent step chose its patches
    # Batches of 2 in question order: [0, 1] [2, 3] to process 0, [4, 5] to process 1; both wrote a part.
    assert "process 0 of 2: 4 of the 6 unanswered questions" in log
    assert "process 1 of 2: 2 of the 6 unanswered questions" in log
    assert "merged 6 answers from" in log


def test_a_relaunch_keeps_what_the_parts_hold(trained, one_process, two_processes, tmp_path):
    """Stopped part-way: process 0 wrote its first batch and was cut in the middle of the next one; process 1 was
    done. The relaunch keeps the 4 answers the parts hold and answers only questions 2 and 3."""
    config, checkpoint = trained
    out = copy_of(two_processes, tmp_path)
    interrupt(out, {0: [0, 1], 1: [4, 5]}, torn=2)
    relaunched = launch_eval(config, checkpoint, out)
    assert relaunched.returncode == 0, relaunched.stderr[-4000:]
    records, summary = outputs(out)
    assert_same_evaluation((records, summary), one_process)
    assert [record["seconds"] == KEPT for record in records] == [True, True, False, False, True, True]
    assert "merged 4 answers from" in relaunched.stderr
    assert "process 0 of 2: 2 of the 2 unanswered questions" in relaunched.stderr
    assert "process 1 of 2: 0 of the 2 unanswered questions" in relaunched.stderr

    # Parts left by an interrupted run are still under the provenance record: other settings are refused by the
    # main process, and the other process stops with it instead of waiting.
    interrupt(out, {0: [0, 1]})
    refused = launch_eval(config, checkpoint, out, "eval.max_new_tokens=6")
    assert refused.returncode != 0
    assert "was made by other weights or settings (max_new_tokens: 5 -> 6)" in refused.stderr


def test_one_process_finishes_what_two_left(trained, one_process, two_processes, tmp_path):
    """A plain ``ivtlr eval`` over the parts of an interrupted two-process run merges them and answers the rest."""
    config, checkpoint = trained
    out = copy_of(two_processes, tmp_path)
    interrupt(out, {0: [0, 1, 2], 1: [5]})
    eval_in_process(config, checkpoint, out)
    records, summary = outputs(out)
    assert_same_evaluation((records, summary), one_process)
    assert [record["seconds"] == KEPT for record in records] == [True, True, True, False, False, True]
    assert "processes" not in summary["run"]


class Process:
    """What ``share_of`` reads of a PartialState, for process ``process_index`` of ``num_processes``."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, process_index: int, num_processes: int):
        self.process_index, self.num_processes = process_index, num_processes


class Question:
    def __init__(self, id: str):
        self.id = id


@pytest.mark.parametrize("processes", [1, 2, 3, 4, 7])
def test_shares_are_whole_batches_in_question_order(processes):
    questions = [Question(f"q{i}") for i in range(11)]
    done = {"q0", "q4", "q5"}
    shares = [share_of(questions, done, 3, Process(index, processes)) for index in range(processes)]
    pending = [question for question in questions if question.id not in done]
    assert [question for share in shares for question in share] == pending
    starts = [sum(len(share) for share in shares[:index]) for index in range(processes)]
    assert all(start % 3 == 0 for start, share in zip(starts, shares) if share)
    batches = [-(-len(share) // 3) for share in shares]
    assert max(batches) - min(batches) <= 1


def test_merge_keeps_the_first_answer_of_each_id_in_question_order(tmp_path):
    predictions = tmp_path / "predictions_x.jsonl"
    predictions.write_text(json.dumps({"id": "b", "n": 0}) + "\n" + json.dumps({"id": "stray", "n": 0}) + "\n")
    part_path(predictions, 1, 2).write_text(json.dumps({"id": "d", "n": 1}) + "\n" + '{"id": "e", "n"')
    part_path(predictions, 0, 2).write_text("".join(json.dumps({"id": i, "n": 1}) + "\n" for i in ("a", "b")))
    part_path(predictions, 0, 3).write_text(json.dumps({"id": "c", "n": 3}) + "\n")
    (tmp_path / "predictions_x.part-0-of-2.jsonl.lock").write_text("")  # not a part
    (tmp_path / "predictions_xy.part-0-of-2.jsonl").write_text("{}\n")  # another evaluation's part
    assert [path.name for path in part_files(predictions)] == [
        "predictions_x.part-0-of-2.jsonl", "predictions_x.part-1-of-2.jsonl", "predictions_x.part-0-of-3.jsonl"]

    assert merge_parts(predictions, ["a", "b", "c", "d", "e"]) == 3
    assert [(r["id"], r["n"]) for r in read_jsonl(predictions)] == [("a", 1), ("b", 0), ("c", 3), ("d", 1),
                                                                    ("stray", 0)]
    assert part_files(predictions) == []
    assert (tmp_path / "predictions_xy.part-0-of-2.jsonl").exists()
    content = predictions.read_bytes()
    assert merge_parts(predictions, ["a"]) == 0  # no parts: the file is left as it is
    assert predictions.read_bytes() == content
