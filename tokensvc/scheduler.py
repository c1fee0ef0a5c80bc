"""One scheduler for every server: a heap of due times, not a task per server.

``schedule`` sets (or moves) a key's due time; the loop sleeps until the
earliest one, or until woken by an earlier ``schedule``. Due keys run as tasks,
at most ``concurrency`` at a time, so a thousand tokens issued together do not
open a thousand connections at once.

When it wakes, the loop also runs the keys due within ``gather`` after now,
a little early, unless they were scheduled ``early=False`` (a retry after a
failure, which may carry the server's Retry-After): one wake-up for several
refreshes instead of one each. On the
virtual machines this was measured on, a token request made alone after a
pause cost twice the CPU of one among others (2.6 against 1.2 ms), most of it
the waking itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from tokensvc import metrics
from tokensvc.token import Clock

log = logging.getLogger(__name__)

# Keys due this soon after the one that woke the loop run with it.
GATHER = timedelta(milliseconds=200)


class Scheduler:
    def __init__(
        self,
        run: Callable[[str], Awaitable[None]],
        clock: Clock,
        *,
        concurrency: int = 16,
        gather: timedelta = GATHER,
    ) -> None:
        self._run = run
        self._clock = clock
        self._gather = gather
        self._heap: list[tuple[datetime, int, str]] = []
        self._due: dict[str, datetime] = {}
        self._exact: set[str] = set()  # keys that may not run before their time
        self._counter = itertools.count()
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        # What the loop sleeps until (None: no due time); only an earlier one wakes it.
        self._sleeping_until: datetime | None = None

    def schedule(self, key: str, when: datetime, *, early: bool = True) -> None:
        self._due[key] = when
        if early:
            self._exact.discard(key)
        else:
            self._exact.add(key)
        heapq.heappush(self._heap, (when, next(self._counter), key))
        if self._sleeping_until is None or when < self._sleeping_until:
            self._wake.set()

    def cancel(self, key: str) -> None:
        self._due.pop(key, None)  # its heap entry is skipped when it surfaces
        self._exact.discard(key)

    def due_at(self, key: str) -> datetime | None:
        return self._due.get(key)

    def _next(self) -> datetime | None:
        while self._heap:
            when, _, key = self._heap[0]
            if self._due.get(key) == when:
                return when
            heapq.heappop(self._heap)  # moved or cancelled
        return None

    def _pop_due(self, ahead: timedelta = timedelta(0)) -> list[tuple[str, datetime]]:
        now = self._clock()
        until, due = now + ahead, []
        while (when := self._next()) is not None and when <= until:
            key = self._heap[0][2]
            if when > now and key in self._exact:
                break  # not before its time; those after it wait for their own wake-up
            heapq.heappop(self._heap)
            del self._due[key]
            self._exact.discard(key)
            due.append((key, when))
        return due

    async def _guarded(self, key: str, when: datetime) -> None:
        async with self._limit:
            metrics.refresh_lag((self._clock() - when).total_seconds())
            try:
                await self._run(key)
            except Exception as exc:  # the refresh records its own failures
                log.debug(
                    "scheduled run failed", extra={"key": key, "exc_type": type(exc).__name__}
                )

    def _spawn(self, key: str, when: datetime) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guarded(key, when), name=f"scheduled:{key}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def run_due(self) -> list[str]:
        """Runs every key due now and waits for them. (Tests with a fake clock
        drive the schedule with this.)"""
        due = self._pop_due()
        await asyncio.gather(*(self._spawn(key, when) for key, when in due))
        return [key for key, _ in due]

    async def _loop_forever(self) -> None:
        while True:
            self._wake.clear()
            for key, due in self._pop_due(self._gather):
                self._spawn(key, due)
            when = self._sleeping_until = self._next()
            timeout = None if when is None else max(0.0, (when - self._clock()).total_seconds())
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a
            # cancellation that lands as the event is set (every schedule sets
            # it), and stop() would then wait forever on a loop still running.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._loop_forever(), name="scheduler")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop, *self._running) if t is not None]
        self._loop = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
