"""Dynamic batching: requests from many clients and tasks become mixed batches for the engine.

asyncio on the request side, ONE worker thread on the engine side (the event loop never blocks on
a forward). A batch closes when it holds `max_rows` rows or `max_tokens` tokens, or `max_wait_ms`
after its first row arrived. Admission control: at most `max_queue` rows wait; beyond that
`submit` raises Overloaded (HTTP 429 with Retry-After). A row whose deadline passed, or whose
caller went away (its future was cancelled), is dropped before it runs. If a batch fails as a
whole, its rows are retried one by one so one bad row fails alone. `close()` stops admission and
drains what is queued and in flight. No torch here (house style 4): the engine call is injected.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from server.errors import DeadlineExceeded, NotReady, Overloaded

T = TypeVar("T")


@dataclass(frozen=True)
class BatcherConfig:
    max_rows: int = 64
    """Most rows in one batch."""
    max_tokens: int = 16384
    """Most input tokens (sum over rows) in one batch; a single larger row still runs alone."""
    max_wait_ms: float = 5.0
    """How long a batch waits for more rows after its first one."""
    max_queue: int = 1024
    """Most rows waiting; more are refused with 429."""
    default_timeout_s: float = 30.0
    """Deadline of a row that names none."""


@dataclass
class _Item(Generic[T]):
    payload: T
    tokens: int
    deadline: float
    future: asyncio.Future = field(repr=False)


class Batcher(Generic[T]):
    def __init__(self, run_batch: Callable[[Sequence[T]], list[Any]], config: BatcherConfig | None = None) -> None:
        self.run_batch, self.config = run_batch, config or BatcherConfig()
        self._queue: deque[_Item[T]] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._closing = False
        self.batch_sizes: list[int] = []  # observed batch sizes (metrics read them)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def run_on_engine_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the engine thread between batches (e.g. a store sync touching the engine)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, payload: T, tokens: int = 1, timeout_s: float | None = None) -> Any:
        if self._closing:
            raise NotReady("the server is shutting down")
        if len(self._queue) >= self.config.max_queue:
            raise Overloaded(f"queue full ({self.config.max_queue} rows waiting)", retry_after=1.0)
        self.start()
        loop = asyncio.get_running_loop()
        item = _Item(payload, tokens, time.monotonic() + (timeout_s or self.config.default_timeout_s), loop.create_future())
        self._queue.append(item)
        self._wakeup.set()
        return await item.future  # a caller that goes away cancels this future: the row is dropped

    async def close(self) -> None:
        """Refuse new rows, finish every queued and in-flight row, stop the worker thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def _live(self, item: _Item[T], now: float) -> bool:
        if item.future.done():  # cancelled by a caller that went away
            return False
        if now > item.deadline:
            item.future.set_exception(DeadlineExceeded("the request waited past its deadline"))
            return False
        return True

    def _take_batch(self) -> list[_Item[T]]:
        batch, tokens, now = [], 0, time.monotonic()
        while self._queue and len(batch) < self.config.max_rows:
            item = self._queue[0]
            if not self._live(item, now):
                self._queue.popleft()
                continue
            if batch and tokens + item.tokens > self.config.max_tokens:
                break
            batch.append(self._queue.popleft())
            tokens += item.tokens
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first_seen = time.monotonic()
            while (len(self._queue) < self.config.max_rows and not self._closing
                   and time.monotonic() - first_seen < self.config.max_wait_ms / 1000):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self.config.max_wait_ms / 1000)
                except TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            await loop.run_in_executor(self._executor, self._run, batch)

    def _run(self, batch: list[_Item[T]]) -> None:
        """On the engine thread: run the batch; on failure, run each row alone."""
        try:
            results = self.run_batch([item.payload for item in batch])
            outcomes = [(item, result, None) for item, result in zip(batch, results, strict=True)]
        except Exception:
            outcomes = []
            for item in batch:
                try:
                    outcomes.append((item, self.run_batch([item.payload])[0], None))
                except Exception as exc:  # noqa: BLE001 - handed to the caller as its own error
                    outcomes.append((item, None, exc))
        for item, result, exc in outcomes:
            item.future.get_loop().call_soon_threadsafe(_settle, item.future, result, exc)


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
