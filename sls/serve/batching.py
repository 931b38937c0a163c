"""Dynamic batching: the requests of one task that are waiting when the model is free run as
one forward pass.

One scheduler serves every task, with ONE inference thread. Requests queue per task; the
tasks with waiting requests queue in the order of their oldest request. When the thread
is free, the scheduler takes the first task in that queue, lets its oldest request wait up
to ``max_wait_ms`` for company (not at all when the thread was busy for longer, or when
``max_batch`` images already wait), and runs up to ``max_batch`` of its waiting images in
one pass; a task with images left goes to the back of the queue. So:

- under load a batch fills with what arrived while the previous one ran (the batch is
  formed when it can run, not when its first request came);
- a request waits behind at most one batch of each other task, however busy that task is;
- two forward passes never fight over the cores (or the GPU's stream).

Decoding and answering run outside the inference thread, on the server's thread pool.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


@dataclass
class Pending:
    """One request's images, waiting for their outputs."""

    images: torch.Tensor
    done: asyncio.Future
    tag: Hashable = None
    arrived: float = field(default_factory=time.monotonic)


class Scheduler:
    """The batching queues of every task, and the one inference thread they share.

    Args:
        executor: the inference thread (a one-thread executor).
        max_batch: the most images of one forward pass (a larger request runs alone, in
            pieces of this size).
        max_wait_ms: how long the oldest request of a batch waits for others.
        observe: called with (task key, the tag of each row of the pass, seconds of the pass).
    """

    def __init__(self, executor: ThreadPoolExecutor, *, max_batch: int, max_wait_ms: float,
                 observe: Callable[[Hashable, list, float], None] | None = None) -> None:  # fmt: skip
        self.executor, self.max_batch, self.max_wait = executor, max_batch, max_wait_ms / 1000
        self.observe = observe or (lambda task, tags, seconds: None)
        self.waiting: dict[Hashable, deque[Pending]] = {}
        self.forwards: dict[Hashable, Callable[[torch.Tensor, list], list]] = {}
        self.order: deque[Hashable] = deque()
        self._arrival = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, task: Hashable, forward: Callable[[torch.Tensor, list], list], images: torch.Tensor,
                     tag: Hashable = None) -> list:  # fmt: skip
        """The outputs of ``images`` (one per image) by ``forward``, once their batch has run;
        the batch's error if it failed. Requests batch together only under the same ``task``
        key; ``forward(images, tags)`` runs on the inference thread with a batch and the
        ``tag`` of each of its rows' requests (a group of tasks' pass tells them apart so)."""
        pending = Pending(images, asyncio.get_running_loop().create_future(), tag)
        self.forwards[task] = forward
        self.waiting.setdefault(task, deque()).append(pending)
        if task not in self.order:
            self.order.append(task)
        self._arrival.set()
        return await pending.done

    async def close(self) -> None:
        """Stop; requests still waiting are cancelled."""
        self._worker.cancel()
        for queue in self.waiting.values():
            for pending in queue:
                pending.done.cancel()

    def _images_waiting(self, task: Hashable) -> int:
        return sum(len(p.images) for p in self.waiting.get(task, ()))

    async def _next_batch(self) -> tuple[Hashable, Callable, list[Pending]]:
        while not self.order:
            self._arrival.clear()
            await self._arrival.wait()
        task = self.order[0]
        while self._images_waiting(task) < self.max_batch and self.waiting.get(task):
            remaining = self.waiting[task][0].arrived + self.max_wait - time.monotonic()
            if remaining <= 0:
                break
            self._arrival.clear()
            try:  # woken by any arrival, to see whether the batch is full
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                break
        self.order.popleft()
        queue, batch, size = self.waiting[task], [], 0
        while queue and (not batch or size + len(queue[0].images) <= self.max_batch):
            batch.append(queue.popleft())
            size += len(batch[-1].images)
        forward = self.forwards[task]
        if queue:
            self.order.append(task)  # the rest waits its turn behind the other tasks
        else:  # nothing of a replaced task or group is kept once its queue is empty
            del self.waiting[task], self.forwards[task]
        return task, forward, [p for p in batch if not p.done.done()]  # a client gone is skipped

    def _run_batch(self, task: Hashable, forward: Callable, images: torch.Tensor, tags: list) -> list:
        outputs = []
        for start in range(0, len(images), self.max_batch):
            piece, piece_tags = images[start : start + self.max_batch], tags[start : start + self.max_batch]
            began = time.perf_counter()
            outputs += list(forward(piece, piece_tags))
            self.observe(task, piece_tags, time.perf_counter() - began)
        return outputs

    async def _run(self) -> None:
        while True:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a fault of the scheduler itself: fail what waits, never hang
                _fail([pending for queue in self.waiting.values() for pending in queue], error)
                self.waiting.clear()
                self.forwards.clear()
                self.order.clear()

    async def _run_once(self) -> None:
        """Run the next batch and answer its requests."""
        task, forward, batch = await self._next_batch()
        if not batch:
            return
        try:
            images = torch.cat([p.images for p in batch])
            tags = [p.tag for p in batch for _ in range(len(p.images))]
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._run_batch, task, forward, images, tags)  # fmt: skip
        except asyncio.CancelledError:
            for pending in batch:
                pending.done.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - every request of the batch gets the model's error
            _fail(batch, error)
            return
        start = 0
        for pending in batch:
            if not pending.done.done():
                pending.done.set_result(outputs[start : start + len(pending.images)])
            start += len(pending.images)


def _fail(pendings: list[Pending], error: Exception) -> None:
    for pending in pendings:
        if not pending.done.done():
            pending.done.set_exception(error)
