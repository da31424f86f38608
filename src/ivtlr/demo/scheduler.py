"""The demo's job scheduler: runs jobs that each need (at most) one parent job's result on ``workers`` spawned worker
processes, each job as soon as its parent has finished, with one progress bar and an estimate of the time left.

The interface, all the demo uses::

    results = JobScheduler(jobs, work, workers, cores).run()   # {name: what work returned}, or the first error

* ``jobs`` maps names to :class:`Job` s, parents before their children; among the jobs ready at a poll, the earlier
  in ``jobs`` starts first.
* ``work(job, parent_checkpoint, threads)`` runs one job in a worker process and returns a :class:`Finished`;
  ``parent_checkpoint`` is the ``checkpoint`` its parent returned (``None`` for a job without a parent) and
  ``threads`` its share of the ``cores``, fixed when it starts: the cores divided among the jobs running then.
  ``work`` must be picklable (a module-level function): the workers are spawned, not forked.
* A job's error is logged with its name and re-raised unchanged by :meth:`JobScheduler.run`; the workers (and the
  jobs they still run) are terminated, and no further job starts. Workers die with the main process on Linux.

The standard library's ``multiprocessing.Pool`` does the process work. ``concurrent.futures.ProcessPoolExecutor``
would not make this shorter: the submit loop is the same, and it cannot stop the jobs still running when one fails
(its ``shutdown`` waits for them) without private attributes.

This module imports neither torch nor the rest of the demo, so that its workers start in a fraction of a second.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import get_context
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: How often the main process starts ready jobs, collects finished ones and redraws the progress bar.
POLL_SECONDS = 1.0
#: The share of a job's progress its logged steps stand for; the last tenth is its evaluation.
_STEPS_SHARE = 0.9


class Job(Protocol):
    """What the scheduler reads of a job."""

    @property
    def parent(self) -> str | None:
        """The name of the job whose ``checkpoint`` this one continues, or ``None``."""

    @property
    def label(self) -> str:
        """What the log calls it."""

    @property
    def cost(self) -> float:
        """Its planned cost relative to the other jobs': the progress bar's unit and the basis of the time left."""

    @property
    def steps(self) -> int:
        """The steps it will log to :attr:`progress_log`."""

    @property
    def progress_log(self) -> Path:
        """A file that gains one line per step done (absent until the first)."""


class Finished(Protocol):
    """What the scheduler reads of a finished job's result (``time.time()`` stamps, seconds)."""

    checkpoint: str  # handed to its children's ``work``
    train_seconds: float
    eval_seconds: float
    started: float
    finished: float


J = TypeVar("J", bound=Job)
R = TypeVar("R", bound=Finished)


def minutes(seconds: float) -> str:
    """``4m05s``: a duration as the demo's log and report write it."""
    whole = max(0, round(seconds))
    return f"{whole // 60}m{whole % 60:02d}s"


def _stop_with_parent() -> None:
    """Worker initializer: on Linux, die with the demo's main process (no orphaned trainings after a kill)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class JobScheduler(Generic[J, R]):
    """Runs ``jobs`` with ``work`` on ``workers`` processes as soon as their parent has finished, with one progress
    bar for all of them. The bar advances with the planned cost of the steps the jobs have logged; the time left is a
    replay of the remaining schedule on the workers at the speed measured so far. :attr:`started` holds each job's
    start (``time.time()`` when it was handed to a worker)."""

    def __init__(self, jobs: Mapping[str, J], work: Callable[[J, str | None, int], R], workers: int, cores: int, *,
                 poll_seconds: float = POLL_SECONDS):
        self.jobs, self.work, self.workers, self.cores = dict(jobs), work, workers, cores
        self.poll_seconds = poll_seconds
        self.started: dict[str, float] = {}

    def run(self) -> dict[str, R]:
        """Every job's result by name, in the order they finished; raises the first error a job raised."""
        results: dict[str, R] = {}
        pending = list(self.jobs)
        running: dict[str, AsyncResult] = {}
        bar = tqdm(total=round(sum(job.cost for job in self.jobs.values())), desc="demo", unit="cost",
                   dynamic_ncols=True, bar_format="{l_bar}{bar}| {elapsed} elapsed{postfix}")
        pool = get_context("spawn").Pool(self.workers, initializer=_stop_with_parent)
        try:
            while pending or running:
                starting = [n for n in pending if self._ready(n, results)][: self.workers - len(running)]
                # The cores are shared by what runs now; a job keeps its thread count to the end.
                threads = max(1, self.cores // max(1, len(running) + len(starting)))
                for name in starting:
                    pending.remove(name)
                    job = self.jobs[name]
                    parent = results[job.parent].checkpoint if job.parent else None
                    running[name] = pool.apply_async(self.work, (job, parent, threads))
                    self.started[name] = time.time()
                    logger.info("demo: started %s (%d thread%s)", job.label, threads, "s" * (threads > 1))
                time.sleep(self.poll_seconds)
                for name in [n for n, result in running.items() if result.ready()]:
                    results[name] = self._collect(name, running.pop(name))
                    logger.info("demo: %s done (training %s, evaluation %s)", self.jobs[name].label,
                                minutes(results[name].train_seconds), minutes(results[name].eval_seconds))
                done = self._done_fractions(results, list(running))
                bar.n = round(sum(self.jobs[name].cost * fraction for name, fraction in done.items()))
                left = self._seconds_left(done, results)
                bar.set_postfix_str(f"about {minutes(left)} left" if left is not None else "", refresh=True)
            pool.close()
        finally:
            pool.terminate()  # a no-op after close(); stops the workers if anything went wrong
            pool.join()
            bar.close()
        return results

    def _collect(self, name: str, result: AsyncResult) -> R:
        try:
            return result.get()  # re-raises a worker's error here
        except Exception:
            logger.error("demo: %s failed", self.jobs[name].label)
            raise

    def _ready(self, name: str, results: Mapping[str, R]) -> bool:
        parent = self.jobs[name].parent
        return parent is None or parent in results

    def _done_fractions(self, results: Mapping[str, R], running: Sequence[str]) -> dict[str, float]:
        """How much of each job is done: finished ones whole, running ones by the steps their progress log holds."""
        done = {name: 1.0 for name in results}
        for name in running:
            job = self.jobs[name]
            log = job.progress_log
            steps = sum(1 for _ in log.open()) if log.exists() else 0
            done[name] = _STEPS_SHARE * min(steps, job.steps) / max(job.steps, 1)
        return done

    def _seconds_left(self, done: Mapping[str, float], results: Mapping[str, R]) -> float | None:
        """Replay what is left on the workers (parents first) at the seconds per cost unit measured so far."""
        now = time.time()
        spent = sum(now - self.started[name] for name, fraction in done.items() if name not in results and fraction)
        spent += sum(result.finished - result.started for result in results.values())
        progressed = sum(self.jobs[name].cost * fraction for name, fraction in done.items())
        if progressed <= 0:
            return None
        seconds_per_cost = spent / progressed
        free_at = [0.0] * self.workers
        finish: dict[str, float] = {name: 0.0 for name in results}
        for name, job in self.jobs.items():  # parents come before their children in the plan
            if name in results:
                continue
            left = job.cost * (1.0 - done.get(name, 0.0)) * seconds_per_cost
            worker = min(range(self.workers), key=free_at.__getitem__)
            start = max(free_at[worker], finish.get(job.parent, 0.0) if job.parent else 0.0)
            finish[name] = free_at[worker] = start + left
        return max(finish.values(), default=0.0)
