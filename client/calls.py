"""One description per API call (method, path, body) and one response reader, shared by the sync
and the async client so the two never drift apart (house style 9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from server import errors

ERRORS: dict[str, type[errors.TaskservError]] = errors.error_types()  # every public error, by its `type`


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: dict[str, Any] | None = None
    admin: bool = False


@dataclass(frozen=True)
class Prediction:
    task: str
    output: str
    label: str | None
    scores: dict[str, float] | None
    task_version: int


def predict(task: str, text: str, max_new_tokens: int | None = None, return_scores: bool = True) -> Call:
    return Call("POST", "/v1/predict", {"task": task, "text": text, "options": {"max_new_tokens": max_new_tokens, "return_scores": return_scores}})


def predict_many(rows: list[tuple[str, str]], max_new_tokens: int | None = None) -> Call:
    return Call("POST", "/v1/predict", {"inputs": [{"task": t, "text": x} for t, x in rows], "options": {"max_new_tokens": max_new_tokens}})


def create_task(name: str, method: str, **fields: Any) -> Call:
    return Call("POST", "/v1/tasks", {"name": name, "method": method, **{k: v for k, v in fields.items() if v is not None}}, admin=True)


def list_tasks() -> Call:
    return Call("GET", "/v1/tasks")


def show_task(name: str) -> Call:
    return Call("GET", f"/v1/tasks/{name}")


def delete_task(name: str) -> Call:
    return Call("DELETE", f"/v1/tasks/{name}", admin=True)


def show_job(job_id: str) -> Call:
    return Call("GET", f"/v1/jobs/{job_id}")


def list_jobs(status: str | None = None, limit: int = 100) -> Call:
    return Call("GET", "/v1/jobs" + (f"?status={status}&limit={limit}" if status else f"?limit={limit}"))


def task_prompt(name: str) -> Call:
    return Call("GET", f"/v1/tasks/{name}/prompt", admin=True)


FINAL_STATES = ("succeeded", "failed", "cancelled")


def job_outcome(job: dict[str, Any]) -> dict[str, Any] | None:
    """None while a job runs; the job once it succeeded; a JobFailed once it failed or was cancelled."""
    if job["status"] not in FINAL_STATES:
        return None
    if job["status"] != "succeeded":
        raise errors.JobFailed(f"job {job['id']} ({job['task']}) {job['status']}: {job.get('error') or 'cancelled'}")
    return job


def request_kwargs(call: Call, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if call.admin and api_key else {}
    return {"method": call.method, "url": call.path, "json": call.json, "headers": headers}


def read(response: httpx.Response) -> Any:
    """The JSON body of a success; otherwise the server's error raised as its own class."""
    if response.is_success:
        return response.json() if response.content else None
    try:
        error = response.json()["error"]
        kind, message = str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = "internal", f"HTTP {response.status_code}: {response.text[:200]}"
    exc = ERRORS.get(kind, errors.TaskservError)(message)
    if isinstance(exc, errors.Overloaded):
        exc.retry_after = float(response.headers.get("Retry-After", exc.retry_after))
    exc.type, exc.status = kind, response.status_code  # kept as the server said them
    raise exc


def prediction(body: dict[str, Any]) -> Prediction:
    return Prediction(**body)
