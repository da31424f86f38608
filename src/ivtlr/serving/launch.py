"""``ivtlr serve`` in a subprocess on a free loopback port, ready once ``/health`` answers: what the load benchmark
and the tests run (standard library only: importing it loads no web framework)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path


class ServerProcess:
    """``python -m ivtlr serve SERVE_ARGS --port P`` with its output in ``log``; ``stop()`` ends it."""

    def __init__(self, serve_args: list[str], log: Path, *, env: Mapping[str, str] | None = None,
                 timeout: float = 180):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "ivtlr", "serve", *serve_args, "--port", str(self.port)]
        self.process = subprocess.Popen(command, env=dict(env) if env is not None else None, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT)
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
        """(status, body) of ``GET path``; an error status is returned, not raised."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM; whether the server then ended as a graceful shutdown ends (uvicorn re-raises the signal once
        every request in flight is answered, so the status is -SIGTERM). Killed if it takes over ``timeout`` s."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout) in (0, -signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return False
