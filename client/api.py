"""`Client` and `AsyncClient`: the same calls (client.calls), one over httpx.Client, one over httpx.AsyncClient."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from client import calls
from client.calls import Prediction


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0) -> None:
        self.api_key = api_key
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def _do(self, call: calls.Call) -> Any:
        return calls.read(self._http.request(**calls.request_kwargs(call, self.api_key)))

    def predict(self, task: str, text: str, max_new_tokens: int | None = None) -> Prediction:
        return calls.prediction(self._do(calls.predict(task, text, max_new_tokens)))

    def predict_many(self, rows: list[tuple[str, str]], max_new_tokens: int | None = None) -> list[Prediction]:
        return [calls.prediction(r) for r in self._do(calls.predict_many(rows, max_new_tokens))["results"]]

    def create_task(self, name: str, method: str, *, wait: bool = False, on_progress: Callable[[dict], None] | None = None, **fields: Any) -> dict[str, Any]:
        """Create a task; a training request answers with its job, which `wait=True` follows to the
        end (`on_progress` sees the job at every poll) before returning the ready task."""
        created = self._do(calls.create_task(name, method, **fields))
        if wait and created.get("job"):
            self.wait_for_job(created["job"], on_progress)
            return {**created, "task": self.task(name)}
        return created

    def wait_for_job(self, job_id: str, on_progress: Callable[[dict], None] | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll a job until it ends: the succeeded job, or JobFailed."""
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if (done := calls.job_outcome(job)) is not None:
                return done
            time.sleep(poll_s)

    def jobs(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self._do(calls.list_jobs(status, limit))["jobs"]

    def task_prompt(self, name: str) -> dict[str, Any]:
        return self._do(calls.task_prompt(name))

    def tasks(self) -> list[dict[str, Any]]:
        return self._do(calls.list_tasks())["tasks"]

    def task(self, name: str) -> dict[str, Any]:
        return self._do(calls.show_task(name))

    def delete_task(self, name: str) -> None:
        self._do(calls.delete_task(name))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._do(calls.show_job(job_id))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0) -> None:
        self.api_key = api_key
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout)

    async def _do(self, call: calls.Call) -> Any:
        return calls.read(await self._http.request(**calls.request_kwargs(call, self.api_key)))

    async def predict(self, task: str, text: str, max_new_tokens: int | None = None) -> Prediction:
        return calls.prediction(await self._do(calls.predict(task, text, max_new_tokens)))

    async def predict_many(self, rows: list[tuple[str, str]], max_new_tokens: int | None = None) -> list[Prediction]:
        return [calls.prediction(r) for r in (await self._do(calls.predict_many(rows, max_new_tokens)))["results"]]

    async def create_task(self, name: str, method: str, *, wait: bool = False, on_progress: Callable[[dict], None] | None = None, **fields: Any) -> dict[str, Any]:
        created = await self._do(calls.create_task(name, method, **fields))
        if wait and created.get("job"):
            await self.wait_for_job(created["job"], on_progress)
            return {**created, "task": await self.task(name)}
        return created

    async def wait_for_job(self, job_id: str, on_progress: Callable[[dict], None] | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        while True:
            job = await self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if (done := calls.job_outcome(job)) is not None:
                return done
            await asyncio.sleep(poll_s)

    async def jobs(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return (await self._do(calls.list_jobs(status, limit)))["jobs"]

    async def task_prompt(self, name: str) -> dict[str, Any]:
        return await self._do(calls.task_prompt(name))

    async def tasks(self) -> list[dict[str, Any]]:
        return (await self._do(calls.list_tasks()))["tasks"]

    async def task(self, name: str) -> dict[str, Any]:
        return await self._do(calls.show_task(name))

    async def delete_task(self, name: str) -> None:
        await self._do(calls.delete_task(name))

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._do(calls.show_job(job_id))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
