"""One training at a time per run directory: a second ``ivtlr train`` into a run another process holds is refused
with one line (exit 2) and writes nothing; the lock of a process that died never blocks the next run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from schema_files import write_m3cot_files
from train_runs import column, single_thread, train_exit_status, train_in_process, write_config

from ivtlr.training.trainer import LOCK_FILE

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

#: Another process holding the run's lock as flock(2) does (no ivtlr code), its pid written in the file.
HOLD = ("import fcntl, os, sys; handle = open(sys.argv[1], 'a+'); fcntl.flock(handle, fcntl.LOCK_EX); "
        "handle.write(f'process {os.getpid()}'); handle.flush(); print('held', flush=True); sys.stdin.read()")


@contextmanager
def _holder(lock: Path) -> Iterator[subprocess.Popen]:
    """A live process holding ``lock`` until the block ends."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.communicate()


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def config(tmp_path) -> Path:
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)  # batch 2: one step per epoch
    return write_config(tmp_path, files, name="k", num_epochs=1)


def test_a_second_training_into_a_held_run_is_refused_and_writes_nothing(config, capsys):
    run_dir = train_in_process(config)
    with _holder(run_dir / LOCK_FILE) as holder:
        before = _files(run_dir)
        capsys.readouterr()
        assert train_exit_status(config, "num_epochs=2") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ivtlr train: error: "), err
        assert f"{run_dir} is being trained by process {holder.pid}" in err
        assert _files(run_dir) == before
    # Once the other process is gone, the same command trains.
    train_in_process(config, "num_epochs=2")
    assert column(run_dir, "step") == [1, 2]


def test_the_lock_of_a_killed_training_does_not_block_the_next(config):
    run_dir = config.parent / "runs" / "k"
    run_dir.mkdir(parents=True)
    with _holder(run_dir / LOCK_FILE) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (run_dir / LOCK_FILE).read_text() == f"process {holder.pid}"  # left behind by the dead process
    train_in_process(config)
    assert column(run_dir, "step") == [1]
