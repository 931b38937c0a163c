"""Dynamic batching and the app's error handling, in one process (the HTTP tests run a real server)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sls.serve.batching import Scheduler


def _recording(log, name, seconds=0.0):
    def forward(images, tags):
        log.append((name, len(images)))
        time.sleep(seconds)
        return [row.sum() for row in images]

    return forward


def _images(n, value=1.0):
    return torch.full((n, 1, 2, 2), value)


@contextlib.asynccontextmanager
async def _scheduler(**settings):
    """A scheduler over its own inference thread, closed (and the thread joined) at the end."""
    with ThreadPoolExecutor(1) as executor:
        scheduler = Scheduler(executor, **settings)
        try:
            yield scheduler
        finally:
            await scheduler.close()


def _run(coroutine):
    return asyncio.run(coroutine)


def test_requests_within_the_window_run_as_one_batch_and_get_their_own_rows():
    async def scenario():
        log = []
        async with _scheduler(max_batch=16, max_wait_ms=200) as scheduler:
            forward = _recording(log, "a")
            answers = await asyncio.gather(*(scheduler.submit("a", forward, _images(n, float(n))) for n in (1, 2, 3)))
        return log, answers

    log, answers = _run(scenario())
    assert log == [("a", 6)]  # one forward pass for the three requests
    assert [[float(x) for x in rows] for rows in answers] == [[4.0], [8.0, 8.0], [12.0, 12.0, 12.0]]


def test_the_forward_function_gets_each_rows_tag():
    async def scenario():
        seen = []

        def forward(images, tags):
            seen.append(list(tags))
            return list(images)

        async with _scheduler(max_batch=16, max_wait_ms=200) as scheduler:
            await asyncio.gather(*(scheduler.submit("group", forward, _images(n), tag=f"t{n}") for n in (1, 2, 3)))
        return seen

    assert _run(scenario()) == [["t1", "t2", "t2", "t3", "t3", "t3"]]


def test_max_batch_is_kept_and_a_larger_request_runs_in_pieces():
    async def scenario():
        log = []
        async with _scheduler(max_batch=4, max_wait_ms=200) as scheduler:
            forward = _recording(log, "a")
            answers = await asyncio.gather(*(scheduler.submit("a", forward, _images(n)) for n in (3, 2, 9)))
        return log, answers

    log, answers = _run(scenario())
    assert [len(a) for a in answers] == [3, 2, 9]
    assert all(size <= 4 for _, size in log) and sum(size for _, size in log) == 14
    assert log[0] == ("a", 3)  # the request of 2 would overflow it: it opens the next batch


def test_a_batch_is_formed_when_it_can_run_not_when_its_first_request_came():
    async def scenario():
        log = []
        async with _scheduler(max_batch=16, max_wait_ms=0) as scheduler:
            a, b = _recording(log, "a", 0.1), _recording(log, "b", 0.01)
            running = asyncio.ensure_future(scheduler.submit("a", a, _images(1)))
            await asyncio.sleep(0.02)  # task a's batch is running; task b's requests wait for the thread
            waiting = [asyncio.ensure_future(scheduler.submit("b", b, _images(1)))]
            await asyncio.sleep(0.02)
            waiting += [asyncio.ensure_future(scheduler.submit("b", b, _images(1))) for _ in range(4)]
            await asyncio.gather(running, *waiting)
        return log

    assert _run(scenario()) == [("a", 1), ("b", 5)]


def test_a_busy_task_delays_another_by_at_most_one_batch():
    async def scenario():
        log = []
        async with _scheduler(max_batch=1, max_wait_ms=0) as scheduler:
            busy, other = _recording(log, "busy", 0.05), _recording(log, "other", 0.05)
            flood = [asyncio.ensure_future(scheduler.submit("busy", busy, _images(1))) for _ in range(8)]
            await asyncio.sleep(0.01)  # the busy task's first batch is running
            await scheduler.submit("other", other, _images(1))
            await asyncio.gather(*flood)
        return log

    log = _run(scenario())
    assert log.index(("other", 1)) <= 2  # behind the busy task's running batch and at most one more


def test_a_failed_batch_fails_its_requests_only():
    async def scenario():
        calls = []

        def forward(images, tags):
            calls.append(len(images))
            if len(calls) == 1:
                raise RuntimeError("boom")
            return list(images)

        async with _scheduler(max_batch=8, max_wait_ms=0) as scheduler:
            with pytest.raises(RuntimeError, match="boom"):
                await scheduler.submit("a", forward, _images(2))
            after = await scheduler.submit("a", forward, _images(1))
        return after

    assert len(_run(scenario())) == 1


def test_a_batch_that_cannot_be_formed_fails_its_requests_and_the_scheduler_goes_on():
    async def scenario():
        log = []
        async with _scheduler(max_batch=8, max_wait_ms=100) as scheduler:
            forward = _recording(log, "a")
            mixed = await asyncio.gather(scheduler.submit("a", forward, torch.zeros(1, 1, 2, 2)),
                                         scheduler.submit("a", forward, torch.zeros(1, 1, 3, 3)),
                                         return_exceptions=True)  # fmt: skip
            after = await scheduler.submit("a", forward, _images(2))
        return mixed, after

    mixed, after = _run(scenario())
    assert all(isinstance(error, RuntimeError) for error in mixed) and len(after) == 2


def test_a_fault_of_the_scheduler_itself_fails_the_waiting_requests_and_it_goes_on():
    async def scenario():
        async with _scheduler(max_batch=8, max_wait_ms=0) as scheduler:
            original, calls = scheduler._next_batch, []

            async def faulty():  # the worker's first look for a batch fails, once a request waits
                calls.append(1)
                if len(calls) == 1:
                    while not any(scheduler.waiting.values()):
                        await asyncio.sleep(0.001)
                    raise KeyError("a bug")
                return await original()

            scheduler._next_batch = faulty
            with pytest.raises(KeyError):
                await asyncio.wait_for(scheduler.submit("a", lambda images, tags: list(images), _images(1)), 5)
            after = await asyncio.wait_for(scheduler.submit("a", lambda images, tags: list(images), _images(2)), 5)
        return after

    assert len(_run(scenario())) == 2


def test_a_model_error_is_a_500_logged_and_the_next_request_is_served(served_tasks, caplog):
    from fastapi.testclient import TestClient

    from sls.data import load_dataset
    from sls.serve import TaskPool, create_app

    pool = TaskPool()
    pool.add(served_tasks["lora3"], "lora3")
    png = io.BytesIO()
    load_dataset("digits").image(0).save(png, format="PNG")
    files = [("images", ("d.png", png.getvalue(), "image/png"))]
    forward, failing = pool.forward, threading.Event()
    failing.set()

    def flaky(name, images):
        if failing.is_set():
            failing.clear()
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return forward(name, images)

    pool.forward = flaky
    with TestClient(create_app(pool)) as client, caplog.at_level(logging.ERROR, logger="sls.serve"):
        answer = client.post("/v1/tasks/lora3/predict", files=files)
        assert answer.status_code == 500
        assert answer.json()["error"].startswith("the model failed on this batch: RuntimeError: CUDA error")
        assert "\n" not in answer.json()["error"]
        assert any("forward pass failed" in r.message and r.exc_info for r in caplog.records)
        again = client.post("/v1/tasks/lora3/predict", files=files)
        assert again.status_code == 200 and again.json()["predictions"][0]["class"]
        metrics = client.get("/metrics").text
        assert 'sls_errors_total{code="500",task="lora3"} 1.0' in metrics
        assert 'sls_requests_total{code="200",task="lora3"} 1.0' in metrics
