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


class Unavailable(TaskservError):
    """Something the server depends on cannot be reached or written right now — the registry
    database (down, unreachable, read-only) or the store's disk (full, read-only). Tasks already
    loaded keep answering; what needs the dependency fails with this, and succeeds on a retry once
    it is back."""

    type, status = "unavailable", 503


class Unauthorized(TaskservError):
    type, status = "unauthorized", 401


class CorruptArtifact(TaskservError):
    """A stored artifact whose files are missing, unreadable or do not match their manifest."""

    type, status = "corrupt_artifact", 500


class DataError(TaskservError):
    """A data file is missing or not in the expected format (or an archive failed verification)."""

    type, status = "data_error", 422


class AssetError(TaskservError):
    """A model shipped in a wheel is missing or could not be prepared."""

    type, status = "asset_error", 500


class Cancelled(TaskservError):
    """A training run stopped because its job was cancelled (or its worker is shutting down)."""

    type, status = "cancelled", 409


def error_types() -> dict[str, type[TaskservError]]:
    """Every public error class by its `type` (what the client maps a response back to)."""
    found: dict[str, type[TaskservError]] = {}
    pending: list[type[TaskservError]] = [TaskservError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.type, cls)
        pending += cls.__subclasses__()
    return found


class JobFailed(TaskservError):
    """A training job the client waited for ended failed or cancelled (its error in the message)."""

    type, status = "job_failed", 500


class NonFinite(TaskservError):
    """A task's tensors or a row's scores are NaN or infinite: there is no honest answer to give."""

    type, status = "non_finite", 500


class BackendFailed(TaskservError):
    """The second engine a row ran on (vLLM) failed to answer it."""

    type, status = "backend_failed", 502


class EngineFailed(TaskservError):
    """The engine raised running the row (alone, after its batch failed as a whole) with something
    that is not a taskserve error — a bug or a broken device; its batch-mates are unaffected."""

    type, status = "engine_failed", 500


class OutOfMemory(EngineFailed):
    """The device ran out of memory running the row, even alone: retry later (memory held by other
    work may be freed) or with a shorter input or fewer new tokens."""

    type, status = "out_of_memory", 503


class ClientGone(TaskservError):
    """The caller disconnected before its rows ran: they are dropped, never run (status 499, the
    nginx convention; nobody reads the answer, the metrics count it)."""

    type, status = "client_gone", 499
