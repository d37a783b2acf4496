"""Dynamic batching in the HTTP process.

LitServe 0.2.19 batches inside the inference worker: it collects requests from a
multiprocessing-manager queue with 1 ms polls, one inter-process round trip per request.
On the 2-core machine this was measured on, that collection, not the model, set the pace:
at 64 concurrent clients the mean batch was 2.2 to 2.9 images (Fashion-MNIST ResNet-20).
Here the requests are gathered where they arrive, and one batch crosses to a worker as one
LitServe request: the classic design of a batching server (a batch waits at most
`timeout_s` for company while a worker is free; while every worker is busy, requests
accumulate and the next batch takes up to `max_batch` of them at once)."""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Awaitable, Callable

import numpy as np


class Batcher:
    """Gathers single requests into batches of at most `max_batch` and hands each batch to
    `submit` (a coroutine taking {"images": uint8 (B, C, H, W), "top_k": [k...]} and
    returning one result per image), with at most `slots` batches in flight (a number, or
    a semaphore shared with other batchers)."""

    def __init__(self, submit: Callable[[dict[str, Any]], Awaitable[list[Any]]],
                 max_batch: int, timeout_s: float, slots: int | asyncio.Semaphore):
        self.submit, self.max_batch, self.timeout_s = submit, max_batch, timeout_s
        # batchers of several models share one semaphore: the workers' slots
        self.slots = asyncio.Semaphore(slots) if isinstance(slots, int) else slots
        self.waiting: deque[tuple[float, np.ndarray, int, asyncio.Future]] = deque()
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.dispatched: set[asyncio.Task] = set()

    async def __call__(self, image: np.ndarray, top_k: int) -> Any:
        """The result for one image, once its batch has run."""
        if self.task is None:
            self.task = asyncio.create_task(self._gather())
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((time.monotonic(), image, top_k, future))
        self.arrived.set()
        return await future

    async def _wait_arrival(self, timeout: float | None) -> None:
        self.arrived.clear()
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _gather(self) -> None:
        while True:
            while not self.waiting:
                await self._wait_arrival(None)
            await self.slots.acquire()
            deadline = self.waiting[0][0] + self.timeout_s  # from the oldest request's arrival
            while len(self.waiting) < self.max_batch and time.monotonic() < deadline:
                await self._wait_arrival(deadline - time.monotonic())
            batch = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
            task = asyncio.create_task(self._run(batch))
            self.dispatched.add(task)
            task.add_done_callback(self.dispatched.discard)

    async def _run(self, batch: list[tuple[float, np.ndarray, int, asyncio.Future]]) -> None:
        try:
            results = await self.submit({"images": np.stack([b[1] for b in batch]),
                                         "top_k": [b[2] for b in batch]})
            for (*_, future), result in zip(batch, results):
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(result)
        except Exception as e:  # the batch failed: each of its requests hears why
            for *_, future in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            self.slots.release()
