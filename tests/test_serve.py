"""``ivtlr serve`` on 127.0.0.1, called with the official ``openai`` client and with raw HTTP: every answer is the one
``ivtlr infer`` gives for that question alone, bad requests get their 4xx, and the server survives its clients."""
from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import ivtlr
from ivtlr.evaluation.infer import answer_question
from schema_files import digit_image
from ivtlr.serving.images import image_data_url as data_url
from servers import MODEL_NAME, Server

QUESTION = "Which digit is written in the image?"
CHOICES = ["zero", "one", "two", "three"]
MAX_TOKENS = 12


def ask(image_index: int, **extra) -> dict:
    """A chat request for the question about digit scan ``image_index``, options lettered as training letters them."""
    content = [{"type": "image_url", "image_url": {"url": data_url(digit_image(image_index))}},
               {"type": "text", "text": QUESTION}]
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "ivtlr": {"choices": CHOICES}, **extra}


def via_client(image_index: int, **extra) -> dict:
    """:func:`ask` as ``openai`` takes it: the extension goes in ``extra_body``."""
    request = ask(image_index, **extra)
    extension = request.pop("ivtlr")
    return {**request, "extra_body": {"ivtlr": extension}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    config, checkpoint = tiny_checkpoint
    running = Server(config, checkpoint, tmp_path_factory.mktemp("serve") / "server.log", "--max-batch", "8",
                     "--max-body-mb", "1")
    yield running
    assert running.stop()


@pytest.fixture(scope="module")
def alone(tiny_checkpoint):
    """``ivtlr infer``'s answer to each question, one question per call (the independent computation)."""
    model = ivtlr.load(tiny_checkpoint[1], device="cpu")
    cache = {}

    def answer(image_index: int):
        if image_index not in cache:
            cache[image_index] = answer_question(model, digit_image(image_index), QUESTION, CHOICES,
                                                 max_new_tokens=MAX_TOKENS)
        return cache[image_index]
    return answer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_an_answer_is_what_infer_gives_alone(client, alone):
    response = client.chat.completions.create(**via_client(3))
    expected = alone(3)
    assert response.choices[0].message.content == expected.text
    assert response.model == MODEL_NAME and response.usage.completion_tokens == expected.n_tokens
    extension = response.model_extra["ivtlr"]
    assert [step["patches"] for step in extension["latent_steps"]] == expected.selected
    assert extension["ar_steps"] == expected.n_tokens


def test_a_streamed_answer_is_the_same_answer(client, alone):
    stream = client.chat.completions.create(**via_client(5), stream=True)
    pieces, last = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        last = chunk
    assert "".join(pieces) == alone(5).text
    assert last.choices[0].finish_reason in ("stop", "length")
    assert [step["patches"] for step in last.model_extra["ivtlr"]["latent_steps"]] == alone(5).selected


def test_concurrent_requests_are_each_answered_as_alone(client, alone, server):
    indices = [1, 2, 3, 4, 6, 7, 8, 9, 1, 2, 10, 11]
    with ThreadPoolExecutor(len(indices)) as pool:
        texts = list(pool.map(lambda i: client.chat.completions.create(**via_client(i)).choices[0].message.content,
                              indices))
    assert texts == [alone(i).text for i in indices]
    metrics = server.get("/metrics")[1]
    occupancy = [line for line in metrics.splitlines() if line.startswith("ivtlr_batch_occupancy_bucket")]
    assert any('le="1.0"' not in line and not line.endswith(" 0.0") for line in occupancy)  # batches of > 1 ran


def test_the_models_health_and_metrics_routes(client, server):
    assert [model.id for model in client.models.list().data] == [MODEL_NAME]
    assert server.health()["status"] == "ok"
    status, text = server.get("/metrics")
    assert status == 200 and "ivtlr_requests_total" in text and "ivtlr_queue_depth" in text


BAD_REQUESTS = [
    ("malformed JSON", b"{not json", 400, "invalid_json"),
    ("a list body", b"[]", 400, None),
    ("wrong type", json.dumps({**ask(1), "max_tokens": "many"}).encode(), 400, "invalid_value"),
    ("unknown model", json.dumps({**ask(1), "model": "gpt-5"}).encode(), 404, "model_not_found"),
    ("n above 1", json.dumps({**ask(1), "n": 2}).encode(), 400, "unsupported_value"),
    ("too many tokens", json.dumps({**ask(1), "max_tokens": 10**6}).encode(), 400, "invalid_value"),
    ("not an image", json.dumps({**ask(1), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
        {"type": "text", "text": QUESTION}]}]}).encode(), 400, "invalid_image"),
    ("remote image", json.dumps({**ask(1), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}).encode(), 400,
     "image_source_not_allowed"),
    ("local file", json.dumps({**ask(1), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode(), 400,
     "image_source_not_allowed"),
    ("two turns", json.dumps({**ask(1), "messages": [{"role": "system", "content": "be brief"},
                                                      *ask(1)["messages"]]}).encode(), 400, "unsupported_value"),
    ("oversized body", json.dumps({**ask(1), "padding": "x" * 2**20}).encode(), 413, "request_too_large"),
]


@pytest.mark.parametrize("name, body, status, code", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_its_4xx_in_the_openai_shape(server, name, body, status, code):
    got, answer = server.post("/v1/chat/completions", body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    if code is not None:
        assert answer["error"]["code"] == code


def test_the_openai_client_sees_the_error(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(**{**via_client(1), "model": "gpt-5"})


def test_a_client_that_leaves_mid_stream_frees_its_place(server, client, alone):
    body = json.dumps(ask(4, max_tokens=200, stream=True)).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (server.health()["active"] or server.health()["queue_depth"]):
        time.sleep(0.1)
    assert server.health()["active"] == 0 and server.health()["queue_depth"] == 0
    assert client.chat.completions.create(**via_client(2)).choices[0].message.content == alone(2).text


def test_a_full_queue_answers_429_and_every_accepted_request_is_answered(tiny_checkpoint, tmp_path, alone):
    config, checkpoint = tiny_checkpoint
    small = Server(config, checkpoint, tmp_path / "server.log", "--max-batch", "1", "--max-queue", "1")
    try:
        body = json.dumps(ask(7, max_tokens=MAX_TOKENS)).encode()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: small.post("/v1/chat/completions", body), range(8)))
        statuses = sorted(status for status, _ in results)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        assert all(answer["choices"][0]["message"]["content"] == alone(7).text
                   for status, answer in results if status == 200)
        assert all(answer["error"]["code"] == "queue_full" for status, answer in results if status == 429)
    finally:
        assert small.stop()


def test_sigterm_finishes_the_requests_in_flight(tiny_checkpoint, tmp_path, alone):
    config, checkpoint = tiny_checkpoint
    server = Server(config, checkpoint, tmp_path / "server.log", "--max-batch", "1")
    body = json.dumps(ask(9, max_tokens=MAX_TOKENS)).encode()
    pool = ThreadPoolExecutor(6)
    sent = [pool.submit(server.post, "/v1/chat/completions", body) for _ in range(6)]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not server.health()["queue_depth"]:
        time.sleep(0.02)
    assert server.health()["queue_depth"]  # requests are waiting when the signal comes
    assert server.stop()
    results = [future.result(timeout=60) for future in sent]
    pool.shutdown()
    assert [status for status, _ in results] == [200] * 6
    assert all(answer["choices"][0]["message"]["content"] == alone(9).text for _, answer in results)
