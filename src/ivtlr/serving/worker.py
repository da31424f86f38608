"""The engine's thread: admits queued questions between passes and advances the running batch one unit per tick.

torch runs here only, one pass at a time, so HTTP handling never waits behind a pass longer than one tick and the
engine never sees two threads. Each job's progress goes back to its request's event loop as :class:`JobEvent`s.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ivtlr.method.interventions import LatentIntervention
from ivtlr.method.live import LiveRequest, vision_of
from ivtlr.serving.errors import APIError
from ivtlr.serving.metrics import ServeMetrics

logger = logging.getLogger(__name__)


@dataclass
class JobEvent:
    kind: str  # "latent" (value: patch indices), "token" (value: id), "done" (value: finish reason), "error"
    value: Any = None


@dataclass
class Job:
    """One request's question for the engine, and the channel its progress comes back through."""

    inputs: dict[str, torch.Tensor]  # a generation batch of one (prompt, latent slots, image tensors)
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    intervention: LatentIntervention | None = None
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    disconnect_checked_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    request: LiveRequest | None = None

    def send(self, event: JobEvent) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(APIError):
    def __init__(self, limit: int):
        super().__init__(429, f"the server's queue is full ({limit} waiting): retry later", kind="rate_limit_error",
                         code="queue_full")


class BatchWorker:
    """Owns a :class:`LiveBatch`; ``submit`` and ``cancel`` are safe from any thread."""

    def __init__(self, engine, *, max_active: int, max_queue: int, metrics: ServeMetrics):
        self.engine, self.max_active, self.max_queue, self.metrics = engine, max_active, max_queue, metrics
        self.live = engine.live_batch()
        self.inbox: collections.deque[Job] = collections.deque()
        self.jobs: list[Job] = []  # admitted, in no particular order
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="ivtlr-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wake:
            if self.stopping:
                raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            free = max(self.max_active - len(self.jobs), 0)  # places the next tick admits from the inbox
            if len(self.inbox) >= self.max_queue + free:
                raise QueueFull(self.max_queue)
            self.inbox.append(job)
            self.metrics.queue_depth.set(len(self.inbox))
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """The client left: free its place (at the next tick if it is in the batch)."""
        with self.wake:
            job.cancelled = True
            self.wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every admitted and queued job, then end the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return len(self.inbox) + len(self.jobs)

    # ------------------------------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not self.inbox and not self.jobs and not self.stopping:
                    self.wake.wait()
                if self.stopping and not self.inbox and not self.jobs:
                    return
                joining = []
                while self.inbox and len(self.jobs) + len(joining) < self.max_active:
                    joining.append(self.inbox.popleft())
                self.metrics.queue_depth.set(len(self.inbox))
            try:
                self._admit(joining)
                self._drop_cancelled()
                self._tick()
            except Exception as error:  # a failed pass fails the requests in it, never the server
                logger.exception("engine pass failed; failing the %d requests in the batch", len(self.jobs))
                for job in self.jobs:
                    job.send(JobEvent("error", f"{type(error).__name__}: {error}"))
                self.jobs, self.live = [], self.engine.live_batch()
            self.metrics.active.set(len(self.jobs))

    def _admit(self, joining: list[Job]) -> None:
        for job in joining:
            if job.cancelled:
                job.send(JobEvent("done", "cancelled"))
                continue
            generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
            sampling = job.temperature > 0
            try:
                job.request = self.live.admit(job.inputs["input_ids"], job.inputs["attention_mask"],
                                              max_new_tokens=job.max_new_tokens, do_sample=sampling,
                                              temperature=job.temperature if sampling else 1.0,
                                              top_p=job.top_p, generator=generator, tag=job,
                                              intervention=job.intervention, **vision_of(job.inputs))
            except (ValueError, RuntimeError) as error:  # the image or prompt does not fit the model
                job.send(JobEvent("error", f"{type(error).__name__}: {error}"))
                continue
            self.jobs.append(job)

    def _drop_cancelled(self) -> None:
        for job in [job for job in self.jobs if job.cancelled]:
            self.live.cancel(job.request)
            self.jobs.remove(job)
            job.send(JobEvent("done", "cancelled"))

    def _tick(self) -> None:
        if not len(self.live):
            return
        self.metrics.occupancy.observe(len(self.live))
        events = self.live.tick()
        self.metrics.passes.inc()
        for event in events:
            job: Job = event.request.tag
            if event.kind == "latent":
                self.metrics.latent_steps.inc()
                job.send(JobEvent("latent", event.value.tolist()))
                continue
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
                self.metrics.first_token.observe(job.first_token_at - job.arrived)
            self.metrics.tokens.inc()
            job.send(JobEvent("token", event.value))
            if event.finished:
                reason = "stop" if event.value in event.request.eos else "length"
                self.metrics.latency.observe(time.perf_counter() - job.arrived)
                job.send(JobEvent("done", reason))
        self.jobs = [job for job in self.jobs if not job.request.finished]
