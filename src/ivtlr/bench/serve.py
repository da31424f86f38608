"""Serving under load: ``ivtlr serve`` with C concurrent clients, against offline batched evaluation and
one-question-at-a-time answering of the same questions, in one run; then a fault run.

- ``offline``: ``ivtlr eval``'s harness (:func:`ivtlr.evaluation.runner.evaluate`) over the questions in batches;
- ``one_at_a_time``: each question answered alone (what ``ivtlr infer`` does per call, the model loaded once);
- ``serve_cC``: the server (a subprocess on 127.0.0.1) with C clients, each sending its next question as soon as
  its last answer came back; questions/s, latency percentiles, mean batch occupancy (from ``/metrics``), failures,
  and whether every answer equals the offline one for the same question id;
- ``faults``: clients that disconnect mid-stream, a burst beyond the queue limit (429s), malformed requests
  interleaved with good ones; afterwards the queue and the batch must be empty, a good request answered right and
  the server's memory within 10 % of before.

Loopback only; bounded in requests and time. The questions are the demo's (the built-in digit puzzles, test split);
the model is ``--checkpoint`` (e.g. the demo's) or, by default, the tiny untrained model of the config.
Run ``ivtlr bench serve --help`` for the options.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import socket
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from ivtlr.bench.common import Target, apply_cpu_settings, format_table, machine_info, report
from ivtlr.data import load_examples
from ivtlr.data.builtin import digit_data_files
from ivtlr.data.example import Example
from ivtlr.serving.launch import ServerProcess

logger = logging.getLogger("bench_serve")

DEFAULT_OUT = Path("benchmarks") / "results" / "serve.json"
MODEL_NAME = "bench"
#: The config the benchmark serves when none is given: the demo's tiny model and data (untrained: every answer runs
#: to max_new_tokens, the heaviest case for the server).
DEFAULT_CONFIG = {"name": MODEL_NAME, "model": "tiny:qwen2_vl", "image_size": 56, "num_selected_patches": 1,
                  "max_latent_stage": 3, "mode": "ivtlr", "patch_order": "position",
                  "dataset": {"source": "digits"}, "eval": {"batch_size": 16, "max_new_tokens": 24}}


@dataclass
class Outcome:
    id: str
    status: int
    seconds: float
    text: str | None = None
    error: str | None = None


@dataclass
class Row:
    variant: str
    clients: int | None
    questions: int
    questions_per_s: float
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    occupancy: float | None = None
    failed: int = 0
    unequal: int | None = None
    peak_mb: float | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="the served run's YAML config (default: the demo's "
                        "tiny model on the digit puzzles)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint of that run (default: none)")
    parser.add_argument("--questions", type=int, default=500, help="questions per concurrency level (default: 500)")
    parser.add_argument("--clients", default="1,8,32,64", help="concurrency levels (default: 1,8,32,64)")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch (default: 64)")
    parser.add_argument("--max-queue", type=int, default=32, help="the server's --max-queue (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the offline runs")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the whole run may take")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12 questions, clients 1 and 4")
    args = parser.parse_args(argv)
    if args.quick:
        args.questions, args.clients, args.max_batch, args.max_queue = 12, "1,4", 8, 4
    args.levels = [int(c) for c in args.clients.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    apply_cpu_settings(args)
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="ivtlr-bench-serve-") as scratch:
        config_path = args.config or _write_default_config(Path(scratch))
        examples = _questions(args.questions)
        offline, answers, one_row = _offline_rows(config_path, args, examples, Path(scratch))
        server = _start_server(config_path, args, Path(scratch) / "server.log")
        try:
            rows = [offline, one_row]
            for clients in args.levels:
                if time.monotonic() > deadline:
                    logger.warning("time is up: skipping %d clients and beyond", clients)
                    break
                rows.append(_serve_row(server, examples, clients, answers))
            faults = _fault_run(server, examples, answers, args)
        finally:
            server.stop()
    results = {"rows": [asdict(row) for row in rows], "faults": faults}
    headers = ["variant", "clients", "questions", "q/s", "p50 s", "p95 s", "p99 s", "occupancy", "failed",
               "unequal", "peak MB"]
    table = format_table(headers, [list(asdict(row).values()) for row in rows])
    table += "\n\nfaults: " + json.dumps(faults)
    machine = machine_info(torch.device(args.device))
    return report("serve", table, _targets(rows, faults), args.out, machine=machine,
                  config={key: str(value) if isinstance(value, Path) else value
                          for key, value in vars(args).items()}, results=results)


def _write_default_config(directory: Path) -> Path:
    path = directory / "bench_serve.yaml"
    path.write_text(yaml.safe_dump({**DEFAULT_CONFIG, "save_path": str(directory / "runs")}))
    return path


def _questions(count: int) -> list[Example]:
    """The demo's test questions, cycled to ``count`` (each copy under its own id)."""
    test = list(load_examples("m3cot", "test", data_files=digit_data_files()))
    return [dataclasses.replace(test[i % len(test)], id=f"{test[i % len(test)].id}#{i // len(test)}")
            for i in range(count)]


def _offline_rows(config_path: Path, args: argparse.Namespace, examples: list[Example], scratch: Path
                  ) -> tuple[Row, dict[str, str], Row]:
    """``ivtlr eval``'s batched harness and one-at-a-time answering, timed on the same model and questions."""
    from ivtlr.config import load_config
    from ivtlr.evaluation.runner import GenerationSettings, evaluate, generate_answers
    from ivtlr.loading import load, load_config_model

    config = load_config(config_path, [])
    device = torch.device(args.device)
    model = load(args.checkpoint, device=device) if args.checkpoint else load_config_model(config, device)
    settings = GenerationSettings(n_latent=model.n_latent(config.eval.n_latent, fallback=config.max_latent_stage),
                                  max_new_tokens=config.eval.max_new_tokens, image_size=model.image_size)
    start = time.perf_counter()
    records = evaluate(model, examples, scratch / "offline.jsonl", settings, batch_size=config.eval.batch_size,
                       answer_rule=config.eval.answer_rule, progress=False)
    offline_s = time.perf_counter() - start
    answers = {record.id: record.messages[1] for record in records}
    alone = examples[: max(len(examples) // 5, 4)]  # a sample: one at a time is the slow baseline
    start = time.perf_counter()
    unequal = 0
    for example in alone:
        (answer,), _ = generate_answers(model, [example], settings)
        unequal += answer.text != answers[example.id]
    alone_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (Row("offline_eval", None, len(examples), len(examples) / offline_s, peak_mb=peak), answers,
            Row("one_at_a_time", None, len(alone), len(alone) / alone_s, unequal=unequal, peak_mb=peak))


def _start_server(config: Path, args: argparse.Namespace, log: Path) -> ServerProcess:
    serve_args = [str(config), "--model-name", MODEL_NAME, "--max-batch", str(args.max_batch), "--max-queue",
                  str(args.max_queue), "--device", args.device]
    if args.checkpoint:
        serve_args += ["--checkpoint", str(args.checkpoint)]
    return ServerProcess(serve_args, log, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def _metric(server: ServerProcess, name: str) -> float:
    """A plain (unlabelled) sample of the server's ``/metrics``; 0 before it has one."""
    for line in server.get("/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _rss_mb(server: ServerProcess, field: str = "VmRSS") -> float | None:
    """The server process's resident memory (``VmHWM``: its peak), from Linux's /proc; None elsewhere."""
    try:
        for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _payload(example: Example, **extra) -> dict:
    from ivtlr.serving.images import image_data_url

    content = [{"type": "image_url", "image_url": {"url": image_data_url(example.image)}},
               {"type": "text", "text": example.question}]
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
            "ivtlr": {"choices": example.choices}, **extra}


def _post(url: str, body: bytes, example_id: str) -> Outcome:
    start = time.perf_counter()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
            return Outcome(example_id, response.status, time.perf_counter() - start,
                           text=answer["choices"][0]["message"]["content"])
    except urllib.error.HTTPError as error:
        return Outcome(example_id, error.code, time.perf_counter() - start, error=error.read().decode()[:200])
    except OSError as error:
        return Outcome(example_id, 0, time.perf_counter() - start, error=str(error))


def _serve_row(server: ServerProcess, examples: list[Example], clients: int, answers: dict[str, str]) -> Row:
    bodies = [(example.id, json.dumps(_payload(example)).encode()) for example in examples]
    passes, occupied = _metric(server, "ivtlr_batch_occupancy_count"), _metric(server, "ivtlr_batch_occupancy_sum")
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(lambda item: _post(server.url, item[1], item[0]), bodies))
    seconds = time.perf_counter() - start
    passes = _metric(server, "ivtlr_batch_occupancy_count") - passes
    occupied = _metric(server, "ivtlr_batch_occupancy_sum") - occupied
    latencies = sorted(outcome.seconds for outcome in outcomes if outcome.status == 200)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    failed = sum(outcome.status != 200 for outcome in outcomes)
    unequal = sum(outcome.status == 200 and outcome.text != answers[outcome.id] for outcome in outcomes)
    return Row(f"serve_c{clients}", clients, len(examples), len(examples) / seconds, cuts[49], cuts[94], cuts[98],
               occupied / passes if passes else None, failed, unequal, _rss_mb(server, "VmHWM"))


def _fault_run(server: ServerProcess, examples: list[Example], answers: dict[str, str],
               args: argparse.Namespace) -> dict:
    before_mb = _rss_mb(server)
    # 1. clients that leave mid-stream
    body = json.dumps(_payload(examples[0], stream=True, max_tokens=64)).encode()
    left = 0
    for _ in range(8):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            left += b"200" in sock.recv(256)
    # 2. a burst beyond the queue: more requests at once than the batch and the queue hold
    burst = args.max_batch + args.max_queue + 16
    bodies = [(example.id, json.dumps(_payload(example)).encode())
              for example in (examples * (burst // len(examples) + 1))[:burst]]
    with ThreadPoolExecutor(burst) as pool:
        outcomes = list(pool.map(lambda item: _post(server.url, item[1], item[0]), bodies))
    burst_statuses = sorted({outcome.status for outcome in outcomes})
    burst_wrong = sum(outcome.status == 200 and outcome.text != answers[outcome.id] for outcome in outcomes)
    # 3. bad requests interleaved with good ones
    bad = [b"{not json", json.dumps({**_payload(examples[0]), "model": "nope"}).encode(),
           json.dumps({**_payload(examples[0]), "max_tokens": "x"}).encode(),
           json.dumps({**_payload(examples[0]), "messages": [{"role": "user", "content": [
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}).encode()]
    mixed = [(f"bad{i}", bad[i // 2 % len(bad)]) if i % 2 else
             (examples[i].id, json.dumps(_payload(examples[i])).encode())
             for i in range(min(4 * len(bad), len(examples)))]
    with ThreadPoolExecutor(8) as pool:
        mixed_outcomes = list(pool.map(lambda item: _post(server.url, item[1], item[0]), mixed))
    bad_answered_4xx = all(400 <= o.status < 500 for o in mixed_outcomes if o.id.startswith("bad"))
    good_right = all(o.status == 200 and o.text == answers[o.id] for o in mixed_outcomes if not o.id.startswith("bad"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (server.health()["active"] or server.health()["queue_depth"]):
        time.sleep(0.1)
    health = server.health()
    after = _post(server.url, json.dumps(_payload(examples[1])).encode(), examples[1].id)
    after_mb = _rss_mb(server)
    return {"disconnected_clients": left, "burst": burst, "burst_statuses": burst_statuses,
            "burst_429": sum(o.status == 429 for o in outcomes), "burst_unequal": burst_wrong,
            "bad_requests_4xx": bad_answered_4xx, "good_interleaved_right": good_right,
            "interleaved": [(o.id, o.status) for o in mixed_outcomes],
            "queue_depth_after": health["queue_depth"], "active_after": health["active"],
            "good_after": after.status == 200 and after.text == answers[examples[1].id], "after_status": after.status,
            "rss_before_mb": before_mb, "rss_after_mb": after_mb,
            "rss_growth": (after_mb / before_mb - 1) if before_mb and after_mb else None}


def _targets(rows: list[Row], faults: dict) -> list[Target]:
    by_name = {row.variant: row for row in rows}
    targets = []
    at = by_name.get("serve_c32") or rows[-1]
    offline, alone = by_name["offline_eval"], by_name["one_at_a_time"]
    targets.append(Target(f"{at.variant} q/s / offline eval q/s", at.questions_per_s / offline.questions_per_s, 0.8,
                          at_most=False))
    targets.append(Target(f"{at.variant} q/s / one-at-a-time q/s", at.questions_per_s / alone.questions_per_s, 5.0,
                          at_most=False))
    served = [row for row in rows if row.clients]
    targets.append(Target("failed or lost requests", sum(row.failed for row in served), 0, at_most=True))
    targets.append(Target("answers unequal to offline", sum(row.unequal or 0 for row in served), 0, at_most=True))
    fault_ok = (faults["bad_requests_4xx"] and faults["good_interleaved_right"] and faults["good_after"]
                and faults["queue_depth_after"] == 0 and faults["active_after"] == 0 and not faults["burst_unequal"]
                and set(faults["burst_statuses"]) <= {200, 429})
    targets.append(Target("fault run checks passed (1 = all)", float(fault_ok), 1, at_most=False))
    if faults["rss_growth"] is not None:
        targets.append(Target("server memory growth over the fault run", faults["rss_growth"], 0.10, at_most=True))
    return targets
