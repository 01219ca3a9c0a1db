"""Dynamic micro-batching: concurrent calls of one row-wise model method merged into one call.

A request waits in a queue; the batcher takes the oldest, adds every compatible request (same
dtype and row shape) up to `max_batch` rows, waits at most `max_wait` seconds for more when the
batch is not full, runs the method once on the concatenated rows in a worker thread and hands
each request its own rows back. The runtime's graphs compute each row independently of the
others in the batch, so a request's result is bit-identical to the same call made alone
(tests/test_serve.py checks it). If a merged call fails, every request in it is retried alone,
so that an error reaches the request that caused it and no other.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from typing import Callable

import numpy as np
from starlette.concurrency import run_in_threadpool

CONCURRENT_CALLS = 2  # merged calls of one batcher running at once


def split(result, sizes: list[int]) -> list:
    """A batched result (array, or frozen dataclass of arrays) cut back into per-request parts."""
    bounds = np.cumsum([0, *sizes])
    if dataclasses.is_dataclass(result):
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        parts = {k: split(v, sizes) for k, v in fields.items()}
        return [type(result)(**{k: parts[k][i] for k in fields}) for i in range(len(sizes))]
    return [result[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class Batcher:
    """Merges concurrent `await batcher(rows)` calls into calls of `fn(all_rows)`.

    on_batch(rows, requests) is called after every call of fn (for metrics)."""

    def __init__(self, fn: Callable, max_batch: int, max_wait_s: float, on_batch: Callable | None = None):
        self.fn, self.max_batch, self.max_wait_s = fn, int(max_batch), float(max_wait_s)
        self.on_batch = on_batch or (lambda rows, requests: None)
        self._pending: deque = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def __call__(self, rows: np.ndarray):
        if self.max_batch <= 1 or len(rows) >= self.max_batch:  # nothing to merge with: run it now
            self.on_batch(len(rows), 1)
            return await run_in_threadpool(self.fn, rows)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            # first call, or on a new event loop (an app is served by one loop, tests may use several)
            self._pending, self._wake = deque(), asyncio.Event()
            self._task = loop.create_task(self._loop())
        future = loop.create_future()
        self._pending.append((rows, future))
        self._wake.set()
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._pending:
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        # two calls at a time: while one runs in onnxruntime, the next batch forms and the event loop
        # parses requests and writes responses (with one, HTTP work and compute would take turns)
        slots, running = asyncio.Semaphore(CONCURRENT_CALLS), set()
        while True:
            await slots.acquire()
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take([])
            deadline = loop.time() + self.max_wait_s
            while batch and sum(len(r) for r, _ in batch) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    pass
                batch = self._take(batch)
            if not batch:
                slots.release()
                continue
            task = loop.create_task(self._run(batch))
            running.add(task)
            task.add_done_callback(lambda t: (running.discard(t), slots.release()))

    def _take(self, batch: list) -> list:
        """Move the queued requests that fit (same dtype and row shape, rows within max_batch)
        from the queue to `batch`, oldest first; the others stay queued in order."""
        rows = sum(len(r) for r, _ in batch)
        key = (batch[0][0].dtype, batch[0][0].shape[1:]) if batch else None
        keep = deque()
        while self._pending:
            item = self._pending.popleft()
            r, future = item
            if future.done():  # the client went away
                continue
            if key is None:
                key = (r.dtype, r.shape[1:])
            if (r.dtype, r.shape[1:]) == key and rows + len(r) <= self.max_batch:
                batch.append(item)
                rows += len(r)
            else:
                keep.append(item)
        self._pending = keep
        return batch

    async def _run(self, batch: list) -> None:
        self.on_batch(sum(len(r) for r, _ in batch), len(batch))
        try:
            if len(batch) == 1:
                results = [await run_in_threadpool(self.fn, batch[0][0])]
            else:
                merged = np.concatenate([r for r, _ in batch])
                results = split(await run_in_threadpool(self.fn, merged), [len(r) for r, _ in batch])
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0][1], error=error)
                return
            for item in batch:  # one bad request must not fail the others: each alone
                await self._run([item])
            return
        for (_, future), result in zip(batch, results):
            _settle(future, result)


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
