"""A chat completion request in the OpenAI schema, checked, and turned into what the engine answers.

The model answers single-turn questions about at most one image, as it was trained: the prompt is the last user
message (its text parts joined, its image). With ``ivtlr.choices`` the text is the question and the options are
lettered exactly as training and ``ivtlr infer`` letter them; without, the text is taken as it is (a client such as
an evaluation harness may format the question itself).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ivtlr.serving.errors import APIError, bad_request


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class IvtlrOptions(BaseModel):
    """The ``ivtlr`` extension of a request."""

    model_config = ConfigDict(extra="forbid")

    n_latent: int | None = Field(default=None, ge=0, le=64)
    num_selected_patches: int | None = Field(default=None, ge=0)
    choices: list[str] | None = Field(default=None, min_length=1, max_length=26)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    n: int = 1
    seed: int | None = None
    ivtlr: IvtlrOptions | None = None


def parse_request(payload: Any) -> ChatRequest:
    """Validate the JSON body; a 400 naming the first wrong field otherwise."""
    if not isinstance(payload, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise bad_request(f"{where}: {first['msg']}", where or None, "invalid_value") from None
    if request.n != 1:
        raise bad_request("n must be 1: one answer per request", "n", "unsupported_value")
    return request


def single_turn(request: ChatRequest) -> tuple[str, str | None]:
    """(the prompt text, the image URL or None) of the request's one user turn."""
    unsupported = [m.role for m in request.messages if m.role != "user"]
    if unsupported:
        raise bad_request(f"only user messages are supported (got {', '.join(sorted(set(unsupported)))}): the model "
                          "answers single-turn questions as it was trained", "messages", "unsupported_value")
    if len(request.messages) != 1:
        raise bad_request(f"send one user message, got {len(request.messages)}: the model answers single-turn "
                          "questions", "messages", "unsupported_value")
    content = request.messages[0].content
    if content is None:
        raise bad_request("the user message has no content", "messages.content")
    if isinstance(content, str):
        return content, None
    texts = [part.text or "" for part in content if part.type == "text"]
    images = [part.image_url for part in content if part.type == "image_url"]
    if any(image is None for image in images):
        raise bad_request("an image_url part needs {\"url\": ...}", "messages.content.image_url")
    if len(images) > 1:
        raise bad_request(f"at most one image per question, got {len(images)}", "messages.content",
                          "unsupported_value")
    return "\n".join(texts), images[0].url if images else None


def max_new_tokens(request: ChatRequest, default: int, limit: int) -> int:
    asked = request.max_completion_tokens or request.max_tokens or default
    if asked > limit:
        raise APIError(400, f"max_tokens={asked} is above this server's limit of {limit}", param="max_tokens",
                       code="invalid_value")
    return asked
