"""The OpenAI error shape: every refusal is a status code and ``{"error": {message, type, param, code}}``."""
from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses; ``status`` is the HTTP status (4xx: the client's to fix)."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
