"""Dynamic batching: the requests of one task that arrive within a short window run as one
forward pass.

Each task has a queue and a worker coroutine. The worker takes the first waiting request,
then gathers more for at most ``max_wait_ms`` or until ``max_batch`` images, and hands the
batch to the ONE inference thread. That thread runs batches in the order they are handed
over, and a task hands over its next batch only when its last one is done: so a request
waits behind at most one batch of each other task, however busy that task is, and a
single thread means two forward passes never fight over the cores (or the GPU's stream).
Decoding and answering run outside that thread, on the server's thread pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class Pending:
    """One request's images, waiting for their outputs."""

    images: torch.Tensor
    done: asyncio.Future


class TaskBatcher:
    """The batching queue of one task.

    Args:
        forward: runs a batch ``(n, c, h, w)`` of the task's images, returns a sequence of
            ``n`` per-image outputs (called on the inference thread).
        executor: the inference thread, shared by every task.
        max_batch: the most images of one forward pass (a larger request runs alone, in
            pieces of this size).
        max_wait_ms: how long the first request of a batch waits for others.
        observe: called with (images in the batch, seconds of its forward pass).
    """

    def __init__(self, forward: Callable[[torch.Tensor], list], executor: ThreadPoolExecutor, *, max_batch: int,
                 max_wait_ms: float, observe: Callable[[int, float], None] | None = None) -> None:  # fmt: skip
        self.forward, self.executor = forward, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.observe = observe or (lambda size, seconds: None)
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._carried: Pending | None = None
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, images: torch.Tensor) -> list:
        """The outputs of ``images`` (one per image), once their batch has run; the batch's
        error if it failed."""
        pending = Pending(images, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.done

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with CancelledError."""
        self._worker.cancel()
        for pending in [self._carried, *self._drain()]:
            if pending is not None and not pending.done.done():
                pending.done.cancel()

    def _drain(self) -> list[Pending]:
        drained = []
        while not self.queue.empty():
            drained.append(self.queue.get_nowait())
        return drained

    async def _gather(self) -> list[Pending]:
        first = self._carried or await self.queue.get()
        self._carried, batch, size = None, [first], len(first.images)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            if self.queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                pending = self.queue.get_nowait()
            if size + len(pending.images) > self.max_batch:
                self._carried = pending  # it opens the next batch
                break
            batch.append(pending)
            size += len(pending.images)
        return batch

    def _run_batch(self, images: torch.Tensor) -> list:
        outputs = []
        for start in range(0, len(images), self.max_batch):
            piece = images[start : start + self.max_batch]
            began = time.perf_counter()
            outputs += list(self.forward(piece))
            self.observe(len(piece), time.perf_counter() - began)
        return outputs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._gather() if not p.done.cancelled()]  # a client gone is skipped
            if not batch:
                continue
            try:
                outputs = await loop.run_in_executor(self.executor, self._run_batch,
                                                     torch.cat([p.images for p in batch]))  # fmt: skip
            except asyncio.CancelledError:
                for pending in batch:
                    pending.done.cancel()
                raise
            except Exception as error:  # noqa: BLE001 - every request of the batch gets the model's error
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(error)
                continue
            start = 0
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_result(outputs[start : start + len(pending.images)])
                start += len(pending.images)
