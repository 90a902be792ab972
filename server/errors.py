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
