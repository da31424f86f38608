import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def run_quick_benchmark(tmp_path):
    """Runs a benchmark script's ``main`` at ``--quick`` sizes on one CPU thread (on a shared 2-core machine, threads
    waiting for each other make tiny steps slow) and returns the JSON it wrote, checked equal to what ``main``
    returned, and that the run flushed denormals as it records. Restores torch's thread count and denormal handling
    afterwards, since the benchmarks set both process-wide."""
    threads = torch.get_num_threads()

    def run(module) -> dict:
        out = tmp_path / f"{module.__name__}.json"
        returned = module.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)])
        written = json.loads(out.read_text())
        assert written == json.loads(json.dumps(returned))
        assert written["machine"]["flush_denormal"] is True
        return written

    yield run
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(config, checkpoint) of one tiny trained run, shared by the tests that serve, shard or harness a model."""
    from schema_files import write_m3cot_files
    from train_runs import train_in_process, write_config

    from ivtlr.checkpoint import latest_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoint")
    files = write_m3cot_files(root / "data", n_train=8, n_test=6)
    config = write_config(root, files, num_epochs=3)
    return config, latest_checkpoint(train_in_process(config) / "checkpoints")
