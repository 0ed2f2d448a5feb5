"""Errors with stable codes, shared by the engine, the protocol and the deploy side.

Each error carries a machine-readable ``code`` that clients can rely on and a
message that says how to fix the problem. HTTP status codes are assigned in one
place only: ``llava_sessions.handler.replies``. This module imports nothing
heavy so deploy code and clients can use it.
"""

from __future__ import annotations


class SessionsError(Exception):
    """Base of every error this product reports to a client."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


# --- client mistakes (4xx) -------------------------------------------------


class InvalidJson(SessionsError):
    code = "INVALID_JSON"


class InvalidRequest(SessionsError):
    code = "INVALID_REQUEST"


class InvalidImage(SessionsError):
    code = "INVALID_IMAGE"


class ImageTooLarge(SessionsError):
    code = "IMAGE_TOO_LARGE"


class ImageSourceNotAllowed(SessionsError):
    code = "IMAGE_SOURCE_NOT_ALLOWED"


class ImageFetchFailed(SessionsError):
    """An allowed image source could not be read: timeout, HTTP or S3 error."""

    code = "IMAGE_FETCH_FAILED"


class TooManyImages(SessionsError):
    code = "TOO_MANY_IMAGES"


class SessionNotFound(SessionsError):
    code = "SESSION_NOT_FOUND"

    def __init__(
        self,
        message: str = "no such session on this endpoint: it was closed, it expired, or it was never "
        "opened. Open a new session with X-Amzn-SageMaker-Session-Id: NEW_SESSION",
    ):
        super().__init__(message)


class SessionBusy(SessionsError):
    """Another turn of the same session is still running."""

    code = "SESSION_BUSY"


class PromptTooLong(SessionsError):
    code = "PROMPT_TOO_LONG"


class TooManySessions(SessionsError):
    """The worker holds its maximum number of sessions; try again later."""

    code = "TOO_MANY_SESSIONS"


class RequestTooLarge(SessionsError):
    """The request body is over the router's size limit."""

    code = "REQUEST_TOO_LARGE"


class RouteNotFound(SessionsError):
    """No such path: the container serves GET /ping and POST /invocations."""

    code = "NOT_FOUND"


class MethodNotAllowed(SessionsError):
    code = "METHOD_NOT_ALLOWED"


class BadHttpRequest(SessionsError):
    """The bytes were not a valid HTTP/1.1 request (request line, headers or framing)."""

    code = "BAD_HTTP_REQUEST"


class RequestTimeout(SessionsError):
    """A request's headers did not arrive in time."""

    code = "REQUEST_TIMEOUT"


class TurnCancelled(SessionsError):
    """The client went away (hung up mid-stream, or while its turn waited or ran): the turn
    stopped and its session is as before it. Nobody reads this answer; logs and metrics do."""

    code = "CLIENT_CLOSED_REQUEST"

    def __init__(self, message: str = "the client closed the connection; the turn was stopped and not kept"):
        super().__init__(message)


# --- our faults (5xx) -----------------------------------------------------


class InternalError(SessionsError):
    code = "INTERNAL_ERROR"


class OutOfMemoryBudget(SessionsError):
    """The request would not fit in the worker's session memory budget even after every
    other session gave its memory back; retry later (or on another worker)."""

    code = "INSUFFICIENT_MEMORY"


class WorkerUnavailable(SessionsError):
    """The worker behind the router could not be reached, or dropped the connection."""

    code = "WORKER_UNAVAILABLE"


class TooManyConnections(SessionsError):
    """The server holds its maximum number of client connections; retry shortly."""

    code = "TOO_MANY_CONNECTIONS"


class ConfigError(ValueError):
    """Bad configuration, raised at start-up (never sent to a client)."""
