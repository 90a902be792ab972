"""Dynamic batching: requests from many clients and tasks become mixed batches for the engine.

asyncio on the request side, ONE worker thread on the engine side (the event loop never blocks on
a forward). A batch closes when it holds `max_rows` rows or `max_chars` input characters, or
`max_wait_ms` after its first row arrived — and not before as many rows are queued as the last batch
had (its clients coming back), or `return_wait` of the last batch's engine time has passed since its
answers went out: closed-loop clients come back spread over tens of ms, and without it a few stragglers
ran as a batch of their own while the rest queued behind them, batches alternating 30 / 2 rows. Under
sequential load (the last batch was one row and no other row arrived before its answer) waiting only
adds latency: a row starts at once, and the window comes back as soon as a batch finds company.
Admission control: at most `max_queue` rows wait; a
request whose rows do not all fit is refused whole with Overloaded (HTTP 429 with Retry-After). A
row whose deadline passed, or whose caller went away (its future was cancelled), is dropped before
it runs. The batch function returns one outcome per row — a result, or that row's own error — so
one bad row never fails its batch-mates; if the call fails as a whole, its rows are retried one by
one. A row's outcome may also be a `concurrent.futures.Future` (a row handed to another engine,
e.g. vLLM): the row settles when it resolves, and a caller going away cancels it. It may also
return a `Partial`: rows that are still generating come with a continuation, which
the loop advances one token at a time, running the next queued batch between two tokens, so a long
generation never holds other rows behind it for more than one decode step (iteration-level
scheduling). A multi-row request fails fast: its first failing row cancels the others, which are dropped
if they have not run yet. `close()` stops admission and drains what is queued and in flight.
No torch here (house style 4): the engine call is injected, and so is what observes each batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from server.configs import require
from server.errors import DeadlineExceeded, NotReady, Overloaded

T = TypeVar("T")


@dataclass(frozen=True)
class BatcherConfig:
    max_rows: int = 64
    """Most rows in one batch."""
    max_chars: int = 16384
    """Most input characters (summed over rows) in one batch; a single longer row still runs alone."""
    max_wait_ms: float = 5.0
    """How long a batch waits for more rows after its first one (not after a lone row: see the module)."""
    max_queue: int = 1024
    """Most rows waiting; more are refused with 429."""
    default_timeout_s: float = 30.0
    """Deadline of a row that names none."""
    return_wait: float = 0.05
    """After a batch, the next one waits for the rows it answered to come back (closed-loop
    clients), at most this share of that batch's engine time (see the module)."""

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_chars", "max_queue"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.max_wait_ms >= 0, "max_wait_ms", "must be >= 0")
        require(0 <= self.return_wait <= 1, "return_wait", "must be in [0, 1]")
        require(self.default_timeout_s > 0, "default_timeout_s", "must be > 0")


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch looked like (handed to the `observe` callback)."""

    rows: int
    waits: list[float]  # seconds each row spent queued before its batch started
    dropped: int  # rows dropped before running (deadline passed, caller gone)


class Continuation(Protocol):
    """Rows of an executed batch that are still generating."""

    @property
    def done(self) -> bool: ...

    def advance(self) -> dict[int, Any]:
        """One more step; the outcomes of the rows (batch positions) that finished with it."""


@dataclass
class Partial:
    """A batch function's answer when some rows are not finished yet."""

    outcomes: dict[int, Any]  # batch position -> outcome, for the rows finished already
    rest: Continuation


@dataclass
class _Item(Generic[T]):
    payload: T
    chars: int
    deadline: float
    future: asyncio.Future = field(repr=False)
    siblings: list[asyncio.Future] = field(default_factory=list, repr=False)  # the other rows of its request
    queued: float = field(default_factory=time.monotonic)


class Batcher(Generic[T]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[T]], list[Any]],
        config: BatcherConfig | None = None,
        observe: Callable[[BatchStats], None] | None = None,
        observe_run: Callable[[float], None] | None = None,
    ) -> None:
        """`run_batch(payloads)` returns one outcome per payload: a result, or an exception
        instance that becomes that row's error. `observe` sees every batch as it starts,
        `observe_run` the engine's seconds on it once it ran (its first pass, for rows that go on
        generating)."""
        self.run_batch, self.config, self.observe, self.observe_run = run_batch, config or BatcherConfig(), observe, observe_run
        self._queue: deque[_Item[T]] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._dropped = 0
        self._active: list[tuple[Continuation, list[_Item[T]]]] = []  # batches still generating (engine thread only)
        self._deferred: set[asyncio.Future] = set()  # rows answered by a Future not resolved yet (event loop only)
        self._lone = False  # the last batch was one row and nobody queued before its answer: sequential load, no window
        self._last = (0, 0.0)  # the last batch: its rows, and until when (monotonic) the next batch waits for them to come back

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def run_on_engine_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the engine thread between batches (e.g. a store sync touching the engine)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, payload: T, chars: int = 1, timeout_s: float | None = None) -> Any:
        return (await self.submit_all([payload], [chars], timeout_s))[0]

    async def submit_all(self, payloads: Sequence[T], chars: Sequence[int], timeout_s: float | None = None) -> list[Any]:
        """Queue the rows of one request together — all of them or none (429) — and return their
        results in order. The first row that fails cancels the rest and its error is raised."""
        if self._closing:
            raise NotReady("the server is shutting down")
        if len(self._queue) + len(payloads) > self.config.max_queue:
            raise Overloaded(f"queue full ({len(self._queue)} of {self.config.max_queue} rows waiting, this request has {len(payloads)})", retry_after=1.0)
        self.start()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + (timeout_s or self.config.default_timeout_s)
        items = [_Item(p, c, deadline, loop.create_future()) for p, c in zip(payloads, chars, strict=True)]
        futures = [item.future for item in items]
        if len(items) > 1:
            for item in items:
                item.siblings = futures
        self._queue.extend(items)
        self._wakeup.set()
        try:
            done, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:  # a failed sibling, or a caller that went away: rows not yet run are dropped
            for f in futures:
                f.cancel()

    async def close(self) -> None:
        """Refuse new rows, finish every queued and in-flight row, stop the worker thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._deferred:  # rows another engine is still answering
            await asyncio.wait(set(self._deferred))
        self._executor.shutdown(wait=True)

    def _live(self, item: _Item[T], now: float) -> bool:
        if item.future.done():  # cancelled by a caller that went away (or a failed sibling)
            return False
        if now > item.deadline:
            _settle(item, DeadlineExceeded("the request waited past its deadline"))
            return False
        return True

    def _take_batch(self) -> list[_Item[T]]:
        batch, chars, now = [], 0, time.monotonic()
        while self._queue and len(batch) < self.config.max_rows:
            item = self._queue[0]
            if not self._live(item, now):
                self._queue.popleft()
                self._dropped += 1
                continue
            if batch and chars + item.chars > self.config.max_chars:
                break
            batch.append(self._queue.popleft())
            chars += item.chars
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and not self._active:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queue:
                if not self._active:  # nothing generating: wait a little for the batch to fill
                    await self._gather()
                batch = self._take_batch()
                if batch:
                    began = time.monotonic()
                    if self.observe is not None:
                        self.observe(BatchStats(len(batch), [began - item.queued for item in batch], self._dropped))
                        self._dropped = 0
                    engine_seconds, answered = await loop.run_in_executor(self._executor, self._run, batch)
                    if self.observe_run is not None:
                        self.observe_run(engine_seconds)
                    self._lone = len(batch) == 1 and all(item.queued >= answered for item in self._queue)
                    self._last = (len(batch), answered + self.config.return_wait * (answered - began))
            if self._active:  # one token for every generating batch, then look at the queue again
                await loop.run_in_executor(self._executor, self._advance)

    async def _gather(self) -> None:
        """Wait for the batch to fill until `max_wait_ms` after its first row *arrived*: rows that
        queued behind a running batch have waited already. Under sequential load (the last batch ran
        alone, nobody queued behind it) a row goes at once. After a batch of n rows, wait too until n
        rows are queued — its clients coming back with their next rows, which arrive spread over tens
        of ms — or `return_wait` of that batch's engine time has passed since its answers went out."""
        if self._lone:
            return
        expected, returns_by = self._last  # a batch never holds more than max_rows
        window_closes = self._queue[0].queued + self.config.max_wait_ms / 1000
        while len(self._queue) < self.config.max_rows and not self._closing:
            now = time.monotonic()
            closes = window_closes if len(self._queue) >= expected else max(window_closes, returns_by)
            if (left := closes - now) <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return

    def _run(self, batch: list[_Item[T]]) -> tuple[float, float]:
        """On the engine thread: run the batch; if the call fails as a whole, run each row alone.
        Returns the engine's seconds on it, and when (monotonic) its answers were handed over: rows
        queued later came after them."""
        started = time.monotonic()
        try:
            answer = self.run_batch([item.payload for item in batch])
            if isinstance(answer, Partial):
                outcomes = [(batch[i], outcome) for i, outcome in answer.outcomes.items()]
                self._active.append((answer.rest, batch))
            else:
                outcomes = list(zip(batch, answer, strict=True))
        except Exception:
            outcomes = []
            for item in batch:
                if item.future.done():  # a sibling's failure cancelled it meanwhile: not worth a forward
                    continue
                try:
                    outcomes.append((item, _finish(self.run_batch([item.payload]))))
                except Exception as exc:  # noqa: BLE001 - handed to the caller as its own error
                    outcomes.append((item, exc))
        answered = time.monotonic()
        for item, outcome in outcomes:
            item.future.get_loop().call_soon_threadsafe(self._settle_or_defer, item, outcome)
        return answered - started, answered

    def _settle_or_defer(self, item: _Item[T], outcome: Any) -> None:
        """On the event loop: settle a row, or — answered by a Future — when that resolves."""
        if not isinstance(outcome, Future):
            _settle(item, outcome)
            return
        loop = item.future.get_loop()
        self._deferred.add(item.future)
        item.future.add_done_callback(lambda f: (self._deferred.discard(f), outcome.cancel() if f.cancelled() else None))
        outcome.add_done_callback(lambda f: loop.call_soon_threadsafe(_settle, item, _resolved(f)))

    def _advance(self) -> None:
        """On the engine thread: one step of every generating batch; settle the rows it finished."""
        still = []
        for rest, batch in self._active:
            try:
                finished = rest.advance()
            except Exception as exc:  # noqa: BLE001 - the batch's unfinished rows get its error
                finished = {i: exc for i, item in enumerate(batch) if not item.future.done()}
                rest_done = True
            else:
                rest_done = rest.done
            for i, outcome in finished.items():
                batch[i].future.get_loop().call_soon_threadsafe(_settle, batch[i], outcome)
            if not rest_done:
                still.append((rest, batch))
        self._active = still


def _finish(answer: Any) -> Any:
    """A one-row batch function answer driven to its end (the retry path)."""
    if not isinstance(answer, Partial):
        return answer[0]
    while 0 not in answer.outcomes:
        answer.outcomes.update(answer.rest.advance())
    return answer.outcomes[0]


def _resolved(future: Future) -> Any:
    """A finished Future's outcome: its result, or its exception (a cancelled one: the caller left)."""
    if future.cancelled():
        return DeadlineExceeded("the row was cancelled before it was answered")
    return future.exception() or future.result()


def _settle(item: _Item, outcome: Any) -> None:
    """On the event loop: hand a row its outcome. A failed row cancels its request's other rows at
    once, so the batch loop never takes them afterwards."""
    if item.future.done():
        return
    if isinstance(outcome, BaseException):
        item.future.set_exception(outcome)
        for sibling in item.siblings:
            sibling.cancel()
    else:
        item.future.set_result(outcome)
