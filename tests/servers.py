"""``ivtlr serve`` started for real in a subprocess on 127.0.0.1 (a free port), and what its tests send it."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from train_runs import subprocess_env

MODEL_NAME = "tiny-served"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running ``ivtlr serve``; ``stop()`` sends SIGTERM and says whether it ended gracefully."""

    def __init__(self, config: Path, checkpoint: Path, log: Path, *options: str, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "ivtlr", "serve", str(config), "--checkpoint", str(checkpoint),
                   "--port", str(self.port), "--model-name", MODEL_NAME, *options]
        self.process = subprocess.Popen(command, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ivtlr serve exited with {self.process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"ivtlr serve did not answer /health in {timeout} s:\n{log.read_text()[-3000:]}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM; whether the server then ended as uvicorn ends a graceful shutdown (it re-raises the signal once
        every request in flight is answered, so the status is -SIGTERM)."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout) in (0, -signal.SIGTERM)
