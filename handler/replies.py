"""What the adapter sends back, and the one place where error codes become HTTP status codes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llava_sessions.errors import SessionsError


@dataclass
class Reply:
    status: int
    body: dict | str  # a dict is rendered as JSON; a str (a streamed turn's last event) as is
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def render(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)


STATUS_BY_CODE: dict[str, int] = {
    "INVALID_JSON": 400,
    "INVALID_REQUEST": 400,
    "INVALID_IMAGE": 400,
    "IMAGE_SOURCE_NOT_ALLOWED": 403,
    # An allowed source that could not be read (missing key, timeout): the image is the dependency.
    "IMAGE_FETCH_FAILED": 424,
    "TOO_MANY_IMAGES": 400,
    "PROMPT_TOO_LONG": 400,
    "SESSION_NOT_FOUND": 404,
    "SESSION_BUSY": 409,
    "IMAGE_TOO_LARGE": 413,
    "REQUEST_TOO_LARGE": 413,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "BAD_HTTP_REQUEST": 400,
    "REQUEST_TIMEOUT": 408,
    "TOO_MANY_SESSIONS": 429,
    # nginx's code for a client that closed the connection before its answer: never delivered.
    "CLIENT_CLOSED_REQUEST": 499,
    "INTERNAL_ERROR": 500,
    "WORKER_UNAVAILABLE": 503,
    "TOO_MANY_CONNECTIONS": 503,
    # Not even evicting every other session frees enough of the worker's memory budget.
    "INSUFFICIENT_MEMORY": 503,
}


def http_status(error: SessionsError) -> int:
    """4xx for client mistakes, 5xx only for our faults; unknown codes are ours."""
    return STATUS_BY_CODE.get(error.code, 500)


def error_reply(error: SessionsError, dialect=None) -> Reply:
    """The error as JSON with its status, in the request's dialect's shape (native without one)."""
    status = http_status(error)
    return Reply(status, error.to_dict() if dialect is None else dialect.error_body(error, status))
