"""The HTTP routes: ``POST /v1/chat/completions`` (plain and streamed), ``GET /v1/models``, ``/health``, ``/metrics``.

A request is read and checked (size, JSON, schema, model name, image, prompt length) before it takes a place in
the queue; its prompt is encoded off the event loop; the :class:`~ivtlr.serving.worker.BatchWorker` answers it
among the others in flight. A client that goes away frees its place; at shutdown every admitted request is
finished before the engine stops.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ivtlr.data.collate import build_prompt_batch
from ivtlr.data.curriculum import format_prompt_text
from ivtlr.loading import LoadedModel
from ivtlr.method.interventions import LatentIntervention
from ivtlr.serving.errors import APIError, bad_request
from ivtlr.serving.images import read_image
from ivtlr.serving.limits import ServeLimits
from ivtlr.serving.metrics import ServeMetrics
from ivtlr.serving.requests import ChatRequest, max_new_tokens, parse_request, single_turn
from ivtlr.serving.worker import BatchWorker, Job, JobEvent

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """What a finished job produced."""

    text: str
    tokens: list[int]
    patches: list[list[int]]
    finish_reason: str


def create_app(model: LoadedModel, *, model_name: str, limits: ServeLimits | None = None) -> FastAPI:
    """The ASGI app serving ``model`` under ``model_name``."""
    limits = limits or ServeLimits()
    metrics = ServeMetrics()
    worker = BatchWorker(model.engine, max_active=limits.max_active, max_queue=limits.max_queue, metrics=metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        logger.info("serving %s (%s) as %r", model.source, model.mode, model_name)
        yield
        logger.info("shutting down: finishing %d requests in flight", worker.in_flight)
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="ivtlr", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        metrics.requests.labels(status=str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "queue_depth": len(worker.inbox), "active": len(worker.jobs)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "ivtlr"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request) -> Response:
        request = parse_request(await _json_body(http, limits.max_body_bytes))
        if request.model != model_name:
            raise APIError(404, f"the model {request.model!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")
        job = await run_in_threadpool(_job_for, request, model, limits)
        job.loop = asyncio.get_running_loop()
        worker.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            return StreamingResponse(_stream(http, job, worker, model, model_name, completion_id, metrics),
                                     media_type="text/event-stream")
        answer = await _wait(http, job, worker, model)
        if answer is None:  # the client left; nobody reads this
            metrics.requests.labels(status="cancelled").inc()
            return Response(status_code=499)
        metrics.requests.labels(status="200").inc()
        return JSONResponse(_completion(answer, job, model_name, completion_id))

    return app


async def _json_body(http: Request, limit: int) -> Any:
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes, more than this server's limit of {limit}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in http.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON ({error})", code="invalid_json") from None


def _job_for(request: ChatRequest, model: LoadedModel, limits: ServeLimits) -> Job:
    """Check the request against the model and the limits, and encode its prompt (image included)."""
    text, image_url = single_turn(request)
    options = request.ivtlr
    image = read_image(image_url, limits) if image_url is not None else None
    if options is not None and options.choices is not None:
        text = format_prompt_text(text, options.choices)
    n_latent = model.n_latent(options.n_latent if options else None)
    batch = build_prompt_batch(model.processor, [(text, image)], n_latent, model.latent_token_id,
                               image_size=model.image_size)
    prompt_tokens = int(batch["input_ids"].shape[1])
    if prompt_tokens > limits.max_prompt_tokens:
        raise bad_request(f"the prompt is {prompt_tokens} tokens (image and latent slots included), more than this "
                          f"server's limit of {limits.max_prompt_tokens}", "messages", "context_length_exceeded")
    k = options.num_selected_patches if options else None
    return Job(inputs=model.place(batch),
               max_new_tokens=max_new_tokens(request, limits.default_max_tokens, limits.max_tokens),
               temperature=request.temperature, top_p=request.top_p, seed=request.seed,
               intervention=LatentIntervention(num_selected_patches=k) if k is not None else None)


DISCONNECT_CHECK_S = 0.25


async def _next_event(http: Request, job: Job, worker: BatchWorker) -> JobEvent | None:
    """The job's next event; None (and its place freed) once the client has disconnected, which is checked at
    least every :data:`DISCONNECT_CHECK_S` seconds, events flowing or not."""
    while True:
        now = time.monotonic()
        if now - job.disconnect_checked_at >= DISCONNECT_CHECK_S:
            job.disconnect_checked_at = now
            if await http.is_disconnected():
                worker.cancel(job)
                return None
        try:
            return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_CHECK_S)
        except asyncio.TimeoutError:
            continue


async def _wait(http: Request, job: Job, worker: BatchWorker, model: LoadedModel) -> Answer | None:
    tokens, patches = [], []
    while (event := await _next_event(http, job, worker)) is not None:
        if event.kind == "latent":
            patches.append(event.value)
        elif event.kind == "token":
            tokens.append(event.value)
        elif event.kind == "error":
            raise APIError(500, f"the engine failed on this request: {event.value}", kind="server_error")
        else:
            return Answer(model.tokenizer.decode(tokens, skip_special_tokens=True), tokens, patches, event.value)
    return None


def _completion(answer: Answer, job: Job, model_name: str, completion_id: str) -> dict[str, Any]:
    prompt_tokens = int(job.inputs["input_ids"].shape[1])
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "finish_reason": answer.finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.tokens),
                  "total_tokens": prompt_tokens + len(answer.tokens)},
        "ivtlr": _extension(answer.patches, answer.tokens),
    }


def _extension(patches: list[list[int]], tokens: list[int]) -> dict[str, Any]:
    """The response's ``ivtlr`` field: what each latent step inserted, and how many tokens were generated."""
    return {"latent_steps": [{"patches": step} for step in patches], "ar_steps": len(tokens)}


async def _stream(http: Request, job: Job, worker: BatchWorker, model: LoadedModel, model_name: str,
                  completion_id: str, metrics: ServeMetrics) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per piece of decoded text, the finish chunk, ``[DONE]``."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}
        return f"data: {json.dumps(body)}\n\n"

    tokens, patches, sent = [], [], ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (event := await _next_event(http, job, worker)) is not None:
            if event.kind == "latent":
                patches.append(event.value)
            elif event.kind == "token":
                tokens.append(event.value)
                text = model.tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(sent) and not text.endswith("\ufffd"):  # hold back a split character
                    yield chunk({"content": text[len(sent):]})
                    sent = text
            elif event.kind == "error":
                metrics.requests.labels(status="500").inc()
                yield f"data: {json.dumps({'error': {'message': event.value, 'type': 'server_error'}})}\n\n"
                return
            else:
                text = model.tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]})
                yield chunk({}, event.value, {"ivtlr": _extension(patches, tokens)})
                yield "data: [DONE]\n\n"
                metrics.requests.labels(status="200").inc()
                return
        metrics.requests.labels(status="cancelled").inc()
    finally:
        if not job.cancelled and (job.request is None or not job.request.finished):
            worker.cancel(job)  # the response was abandoned mid-stream
