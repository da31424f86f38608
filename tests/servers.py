"""``ivtlr serve`` started for real in a subprocess on 127.0.0.1 (a free port) on a tiny checkpoint, and the raw
HTTP its tests send it."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from ivtlr.serving.launch import ServerProcess
from train_runs import subprocess_env

MODEL_NAME = "tiny-served"


class Server(ServerProcess):
    """A running ``ivtlr serve CONFIG --checkpoint DIR``, served as :data:`MODEL_NAME`."""

    def __init__(self, config: Path, checkpoint: Path, log: Path, *options: str, timeout: float = 120):
        super().__init__([str(config), "--checkpoint", str(checkpoint), "--model-name", MODEL_NAME, *options], log,
                         env=subprocess_env(), timeout=timeout)

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
