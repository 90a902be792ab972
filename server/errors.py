"""The one error type of taskserve.

Every failure a caller can cause or observe is a `TaskservError` carrying a machine-readable `type`
and the HTTP status the API answers with; the API has one handler that serialises it as
`{"error": {"type", "message"}}` and the client maps `type` back to the same class.
"""

from __future__ import annotations


class TaskservError(Exception):
    """Base error: `type` names the failure for clients, `status` is the HTTP status code."""

    type: str = "internal"
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "message": self.message}}


class InvalidRequest(TaskservError):
    type, status = "invalid_request", 422


class NotFound(TaskservError):
    type, status = "not_found", 404


class Conflict(TaskservError):
    type, status = "conflict", 409


class InputTooLong(TaskservError):
    type, status = "input_too_long", 413


class Incompatible(TaskservError):
    """An artifact or operation does not fit this backbone or method (e.g. TPV origins differ)."""

    type, status = "incompatible", 422


class Overloaded(TaskservError):
    """The request queue is full; retry after `retry_after` seconds."""

    type, status = "overloaded", 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(TaskservError):
    type, status = "deadline_exceeded", 504


class NotReady(TaskservError):
    type, status = "not_ready", 503


class Unauthorized(TaskservError):
    type, status = "unauthorized", 401
