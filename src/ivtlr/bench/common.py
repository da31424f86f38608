"""Shared benchmark plumbing: timing, exact peak memory, targets, a text table and a JSON record of the machine.

Numbers from different machines are only comparable with the machine written next to them, so every result
file carries the CPU or GPU name, library versions and thread count. Memory is counted from the tensor
allocator (never RSS, which also counts the interpreter, libraries and freed-but-cached pages).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import transformers
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from ivtlr.files import write_text_atomically
from ivtlr.machine import cpu_model_name

if TYPE_CHECKING:
    from ivtlr.testing import TinyBundle

logger = logging.getLogger(__name__)

MIB = 2**20

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class BenchModelSizes:
    """The tiny model every benchmark measures by default (each benchmark's config adds its own shape)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1024


@dataclass
class Measurement:
    """Wall times of repeated calls of one variant and the peak tensor memory of one call."""

    name: str
    times_s: list[float]
    peak_bytes: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_s) * 1e3

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def as_dict(self) -> dict:
        return {"name": self.name, "median_ms": self.median_ms, "times_ms": [t * 1e3 for t in self.times_s],
                "peak_mib": self.peak_mib, "peak_bytes": self.peak_bytes}


@dataclass
class Target:
    """A tracked goal: ``value`` must be at most (``at_most=True``) or at least ``bound``."""

    name: str
    value: float
    bound: float
    at_most: bool

    @property
    def passed(self) -> bool:
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def describe(self) -> str:
        relation = "<=" if self.at_most else ">="
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.value:.2f} (target {relation} {self.bound:g})"

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock reading covers the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                     prepare: Callable[[], object] = lambda: None) -> dict[str, list[float]]:
    """Seconds taken by each call of each function: ``warmup`` untimed calls of each (caches, kernel selection
    and lazy initialisation would otherwise land in the first timing), then ``repeats`` rounds calling every
    function once, so that a burst of load from elsewhere on the machine hits all of them alike.
    ``prepare`` runs, untimed, before every call (e.g. dropping the previous step's gradients)."""
    for fn in fns.values():
        for _ in range(warmup):
            prepare()
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            prepare()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _allocation_events(nodes) -> list:
    """Every allocator event (positive: allocation, negative: free) in a profiler event tree.

    The public profiler tables only sum allocations per operator; the event tree is where each allocation and
    free is recorded on its own, with its address and time."""
    found = []
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            found.append(node)
        stack.extend(node.children)
    return found


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the tensor memory that one call of ``fn`` allocates and still holds, over the call.

    The profiler records every CPU allocator call with its address, size and time; replayed in time order they
    give the call's allocation timeline. Frees of blocks allocated before the call are left out: the profiler
    knows their sizes only when an earlier profiled call allocated them, which would make the result depend on
    what was profiled before.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = _allocation_events(prof.profiler.kineto_results.experimental_event_tree())
    live: dict[int, int] = {}
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_time_ns):
        fields = event.extra_fields
        if fields.device.type != "cpu":
            continue
        if fields.alloc_size > 0:
            live[fields.ptr] = fields.alloc_size
            held += fields.alloc_size
            peak = max(peak, held)
        elif fields.ptr in live:
            held -= live.pop(fields.ptr)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of tensor memory allocated on ``device`` during one call of ``fn``, above what it started with."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    return cuda_peak_bytes(fn, device) if device.type == "cuda" else cpu_peak_bytes(fn)


def measure_all(fns: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                prepare: Callable[[], object] = lambda: None) -> dict[str, Measurement]:
    """Time every function (interleaved, see :func:`time_interleaved`), then measure each one's peak memory in
    one more, separate call so that profiling overhead never enters the timings."""
    times = time_interleaved(fns, device, warmup, repeats, prepare)
    results = {}
    for name, fn in fns.items():
        prepare()
        gc.collect()
        results[name] = Measurement(name, times[name], peak_bytes(fn, device))
        logger.info("%s: %.1f ms/step (median of %d), peak %.1f MiB", name, results[name].median_ms, repeats,
                    results[name].peak_mib)
    return results


def load_average() -> float:
    """The machine's 1-minute load: other work slows every variant, so a high load flags timings to distrust."""
    return os.getloadavg()[0]


def _flushes_denormals() -> bool:
    """Whether float32 denormals currently become zero (the smallest normal float halved survives otherwise)."""
    tiny = torch.tensor(torch.finfo(torch.float32).tiny, dtype=torch.float32)
    return bool((tiny / 2) == 0)


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "device": device.type,
        "cpu": cpu_model_name(),
        "torch_threads": torch.get_num_threads(),
        "flush_denormal": _flushes_denormals(),
        "load_average_1min": load_average(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table; floats get two decimals, missing values a dash."""
    def cell(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")
    logger.info("wrote %s", path)
    return path


def report(benchmark: str, table: str, verdicts: Sequence[Target], out: str | Path, *, machine: dict, config: dict,
           results: dict) -> dict:
    """Log the table and the target verdicts, write the JSON record every benchmark writes, and return it."""
    logger.info("\n%s", table)
    for target in verdicts:
        logger.info(target.describe())
    payload = {"benchmark": benchmark, "machine": machine, "config": config, "results": results,
               "targets": [t.as_dict() for t in verdicts]}
    write_json(out, payload)
    return payload


def benchmark_parser(description: str, default_out: Path, *, warmup: int, unit: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes (each adds its own)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5, help=f"timed {unit}s per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed {unit}s per variant before timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice); recorded with the results")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="leave the CPU's denormal handling as it is (default: flush denormals to zero, see "
                             "apply_cpu_settings)")
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke test")
    return parser


#: The benchmark configs' image sizes are Qwen2-VL's: 28-pixel merged patches (280 -> 10x10 image tokens).
REFERENCE_MERGED_PATCH = 28


def family_image_size(family: str, image_size: int) -> int:
    """The square side that gives ``family`` the image-token grid ``image_size`` gives Qwen2-VL, so that families
    with other patch sizes are measured on as many image tokens; families without merged patches keep it."""
    from ivtlr.testing import build_processor, build_tokenizer

    image_processor = build_processor(family, build_tokenizer(family)).image_processor
    patch = getattr(image_processor, "patch_size", None)
    if patch is None:
        return image_size
    return image_size // REFERENCE_MERGED_PATCH * patch * getattr(image_processor, "merge_size", 1)


def build_bench_model(config, dtype: torch.dtype, device: torch.device, family: str = "qwen2_vl"):
    """The benchmarks' tiny ``family`` model (sdpa) at ``config``'s sizes, on ``device``."""
    from ivtlr.testing import build_tiny

    bundle = build_tiny(family, attn_implementation="sdpa", hidden_size=config.hidden_size,
                        num_layers=config.num_layers, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                        intermediate_size=config.intermediate_size, image_size=config.image_size, dtype=dtype)
    bundle.model.to(device)
    return bundle


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a benchmark's options; ``--quick`` (a smoke run) times one call per variant without warmup."""
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    return args


def apply_cpu_settings(args: argparse.Namespace) -> None:
    """Threads as asked, and denormal floats flushed to zero unless ``--keep-denormals``.

    On x86 CPUs an operation on denormal floats (below 1.2e-38 in float32) takes many times as long as on normal
    ones. Which variant of a comparison produces them depends on its data (the latent chain feeds hidden states back
    as inputs, and its backward pass then meets tiny gradients), so with them left in, the same matrix product of the
    same shape ran 7 to 40 % slower in one variant than in another on this project's machine, and ratios measured
    the values, not the work. Flushing them is PyTorch's advice for CPU speed; every variant runs under it alike, and
    the setting is recorded with the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not getattr(args, "keep_denormals", False):
        torch.set_flush_denormal(True)


def bench_setup(args: argparse.Namespace, full: ConfigT, quick: ConfigT
                ) -> tuple[torch.device, torch.dtype, ConfigT, TinyBundle]:
    """Device, dtype, threads, sizes and model as the common options ask, so every benchmark starts alike."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    apply_cpu_settings(args)
    config = quick if args.quick else full
    family = getattr(args, "family", "qwen2_vl")
    config = dataclasses.replace(config, image_size=family_image_size(family, config.image_size))
    return device, dtype, config, build_bench_model(config, dtype, device, family)


#: Ordinary text the benchmarks fill questions, answers and stand-in rows with.
FILLER = ("Look at the image and think about each step before you give the final answer. Count the objects in "
          "each row, compare the two numbers and read the options carefully. ")


def filler_ids(bundle: TinyBundle, n: int) -> list[int]:
    """``n`` token ids of :data:`FILLER`, repeated as needed."""
    ids: list[int] = []
    while len(ids) < n:
        ids += bundle.tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    return ids[:n]


def chat_prompts(bundle: TinyBundle, question_tokens: int, image_side: int, batch: int) -> dict[str, torch.Tensor]:
    """``batch`` chat prompts of equal length (a ``question_tokens``-token question), each with its own square
    picture: the processor's outputs, on the CPU (no padding anywhere)."""
    from ivtlr.testing import make_test_image

    question = bundle.tokenizer.decode(filler_ids(bundle, question_tokens))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = bundle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [make_test_image((image_side, image_side), seed=b) for b in range(batch)]
    return dict(bundle.processor(text=[text] * batch, images=images, return_tensors="pt"))
