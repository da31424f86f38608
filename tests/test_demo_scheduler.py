"""``ivtlr.demo.scheduler`` on tiny fake jobs run by spawned workers: a job starts only after its parent finished and
gets its parent's checkpoint, ready jobs start in plan order, at most ``workers`` run at once and share the cores, a
failing job is logged by name, re-raised and stops the run (its running siblings killed, its children never started),
and the times of every job are recorded. Each run takes about a second (mostly starting the workers)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivtlr.demo.scheduler import JobScheduler

POLL = 0.02  # the demo polls every second; the fake jobs last a fraction of that


@dataclass(frozen=True)
class FakeJob:
    name: str
    parent: str | None
    out: Path  # where it writes its "checkpoint", a file holding its name
    sleep: float = 0.0
    fail: bool = False
    cost: float = 1.0
    steps: int = 10

    @property
    def label(self) -> str:
        return self.name

    @property
    def progress_log(self) -> Path:
        return self.out / f"{self.name}.log"


@dataclass(frozen=True)
class FakeResult:
    checkpoint: str
    train_seconds: float
    eval_seconds: float
    started: float
    finished: float
    threads: int
    parent_said: str | None  # what the parent's checkpoint file held when this job started


def fake_work(job: FakeJob, parent_checkpoint: str | None, threads: int) -> FakeResult:
    """Runs in a spawned worker: reads the parent's checkpoint, sleeps, writes its own (or fails)."""
    started = time.time()
    parent_said = Path(parent_checkpoint).read_text() if parent_checkpoint is not None else None
    time.sleep(job.sleep)
    if job.fail:
        raise RuntimeError(f"fake job {job.name} broke")
    checkpoint = job.out / f"{job.name}.ckpt"
    checkpoint.write_text(job.name)
    finished = time.time()
    return FakeResult(str(checkpoint), finished - started, 0.0, started, finished, threads, parent_said)


def plan(out: Path, *specs: tuple) -> dict[str, FakeJob]:
    """``(name, parent, keys)`` tuples -> jobs in that (plan) order."""
    return {name: FakeJob(name, parent, out, **keys) for name, parent, keys in specs}


def run(jobs, workers: int, cores: int) -> tuple[JobScheduler, dict[str, FakeResult]]:
    scheduler = JobScheduler(jobs, fake_work, workers, cores, poll_seconds=POLL)
    return scheduler, scheduler.run()


def started_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("demo: started")]


def test_a_job_starts_after_its_parent_finished_with_its_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ivtlr.demo.scheduler")
    jobs = plan(tmp_path, ("a", None, {"sleep": 0.2}), ("b", "a", {"sleep": 0.1}), ("c", "a", {"sleep": 0.1}),
                ("d", "b", {}))
    scheduler, results = run(jobs, workers=2, cores=2)

    assert set(results) == set(jobs)
    for name, job in jobs.items():
        assert Path(results[name].checkpoint).read_text() == name
        if job.parent is None:
            assert results[name].parent_said is None
        else:  # handed to a worker only once the parent had returned, and given the parent's own checkpoint
            assert results[name].parent_said == job.parent
            assert scheduler.started[name] >= results[job.parent].finished
            assert results[name].started >= results[job.parent].finished
    # a first, alone, on both cores; then its two children together, on one core each; d after b
    assert list(scheduler.started) == ["a", "b", "c", "d"]
    lines = started_lines(caplog)
    assert lines[:3] == ["demo: started a (2 threads)", "demo: started b (1 thread)", "demo: started c (1 thread)"]
    assert [r.threads for r in (results["a"], results["b"], results["c"])] == [2, 1, 1]
    assert len(lines) == 4 and lines[3].startswith("demo: started d (")  # 1 or 2 threads: whether c still runs
    assert [r.getMessage() for r in caplog.records if "done" in r.getMessage()][0] == \
        "demo: a done (training 0m00s, evaluation 0m00s)"


def test_ready_jobs_start_in_plan_order(tmp_path):
    # One worker: after a, both c (no parent) and b (a's child) are ready; c comes first in the plan.
    jobs = plan(tmp_path, ("a", None, {}), ("c", None, {}), ("b", "a", {}), ("d", "b", {}))
    scheduler, results = run(jobs, workers=1, cores=1)
    assert list(scheduler.started) == ["a", "c", "b", "d"]
    order = sorted(results, key=lambda name: results[name].started)
    assert order == ["a", "c", "b", "d"]
    assert all(results[n].finished <= results[m].started for n, m in zip(order, order[1:]))  # never two at once


def test_at_most_workers_jobs_run_at_once_and_share_the_cores(tmp_path):
    jobs = plan(tmp_path, *((name, None, {"sleep": 0.5}) for name in "abcd"))
    scheduler, results = run(jobs, workers=2, cores=4)
    events = sorted([(r.started, 1) for r in results.values()] + [(r.finished, -1) for r in results.values()])
    running = peak = 0
    for _, change in events:  # an end before a start at the same instant
        running += change
        peak = max(peak, running)
    assert peak == 2  # both workers used, never more
    assert all(r.threads == 2 for r in results.values())  # 4 cores shared by the 2 running
    assert list(scheduler.started) == list("abcd")


def test_a_failing_job_is_named_and_stops_the_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ivtlr.demo.scheduler")
    jobs = plan(tmp_path, ("slow", None, {"sleep": 10.0}), ("bad", None, {"sleep": 0.1, "fail": True}),
                ("child", "bad", {}), ("later", None, {}))
    scheduler = JobScheduler(jobs, fake_work, 2, 2, poll_seconds=POLL)
    start = time.time()
    with pytest.raises(RuntimeError, match="fake job bad broke"):  # the worker's own error, unchanged
        scheduler.run()
    assert time.time() - start < 5.0  # the slow sibling was killed, not waited for
    errors = [r for r in caplog.records if r.name == "ivtlr.demo.scheduler" and r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["demo: bad failed"]
    assert list(scheduler.started) == ["slow", "bad"]  # nothing started after the failure
    assert not (tmp_path / "slow.ckpt").exists() and not (tmp_path / "child.ckpt").exists()


def test_progress_and_time_left_replay_the_plan(tmp_path):
    jobs = plan(tmp_path, ("a", None, {"cost": 2.0}), ("b", "a", {}), ("c", None, {}))
    scheduler = JobScheduler(jobs, fake_work, 2, 2, poll_seconds=POLL)
    (tmp_path / "a.log").write_text("step\n" * 5)  # half of a's 10 steps, so 0.45 of it (the rest is evaluation)
    done = scheduler._done_fractions({}, ["a"])
    assert done == {"a": pytest.approx(0.45)}
    scheduler.started["a"] = time.time() - 9.0  # 9 s for 0.9 cost units: 10 s per unit
    # a has 11 s left; b (its child) starts then on the other worker, c after a on the first: both end at 21 s.
    assert scheduler._seconds_left(done, {}) == pytest.approx(21.0, abs=0.1)
    assert scheduler._seconds_left({}, {}) is None  # nothing measured yet
