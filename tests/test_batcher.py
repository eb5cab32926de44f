"""Tests of the in-process adaptive batcher with stand-in models: order, splitting, greedy/waiting, overload, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import ApiError

SHAPE = (2, 2, 3)


def tagged(value: int, count: int = 1) -> np.ndarray:
    """(count, 2, 2, 3) uint8 images whose every pixel is `value + i`: the stand-in model echoes it back."""
    return (np.arange(count, dtype=np.uint8)[:, None, None, None] + value) * np.ones((count, *SHAPE), np.uint8)


class EchoModel:
    """predict: (N, 2, 2, 3) -> (N, 1) float32 = each image's first pixel; records every batch it saw.

    `gate` (a threading.Event) holds each call until set, to fill the queue while the model is busy."""

    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.fail_on = fail_on
        self.started = threading.Event()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        values = [int(v) for v in pixels[:, 0, 0, 0]]
        self.batches.append(values)
        if self.fail_on is not None and self.fail_on in values:
            raise RuntimeError("model exploded")
        return pixels[:, 0, 0, :1].astype(np.float32)


@contextlib.asynccontextmanager
async def started(model, **settings):
    """A Batcher on `model`, started, and stopped on the way out (a failing test's too)."""
    batcher = Batcher(model, **settings)
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()


def run(coroutine_function, *args):
    return asyncio.run(coroutine_function(*args))


async def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def wait_until_started(model: EchoModel) -> None:
    while not model.started.is_set():
        await asyncio.sleep(0.005)


def test_concurrent_requests_get_their_own_rows_and_are_batched():
    async def scenario():
        model = EchoModel()
        async with started(model, max_batch_size=16, max_latency_ms=0, max_queue=1000) as batcher:
            deadline = await deadline_in(10)
            # 120 requests of 1 or 2 images with distinct values, all in flight at once.
            requests = [tagged(v, count=1 + v % 2) for v in range(0, 240, 2)]
            results = await asyncio.gather(*(batcher.submit(p, deadline) for p in requests))
        return model, requests, results

    model, requests, results = run(scenario)
    for pixels, rows in zip(requests, results, strict=True):
        assert rows.tolist() == [[float(v)] for v in pixels[:, 0, 0, 0]]
    assert max(len(b) for b in model.batches) > 1  # requests really were joined
    assert all(len(b) <= 16 for b in model.batches)
    assert sum(len(b) for b in model.batches) == sum(len(p) for p in requests)


def test_a_request_larger_than_the_batch_size_is_split_and_reassembled_in_order():
    async def scenario():
        model = EchoModel()
        async with started(model, max_batch_size=4, max_latency_ms=0, max_queue=100) as batcher:
            rows = await batcher.submit(tagged(10, count=10), await deadline_in(10))
        return model, rows

    model, rows = run(scenario)
    assert rows[:, 0].tolist() == list(range(10, 20))
    assert all(len(b) <= 4 for b in model.batches)


def test_a_lone_request_does_not_wait_for_the_latency_budget():
    async def scenario():
        # A 60 s budget: if a lone request waited for company it would miss its 2 s deadline.
        async with started(EchoModel(), max_batch_size=8, max_latency_ms=60_000, max_queue=10) as batcher:
            rows = await batcher.submit(tagged(7), await deadline_in(2))
        return rows

    assert run(scenario).tolist() == [[7.0]]


def test_a_burst_of_requests_starts_the_model_at_its_first_request():
    # 20 requests become ready together, each with 5 ms of work on the event loop before it is submitted (like
    # parsing a burst of uploads). The model starts with the first, not after the whole burst has been parsed.
    async def scenario():
        model = EchoModel()
        async with started(model, max_batch_size=64, max_latency_ms=0, max_queue=100) as batcher:
            deadline = await deadline_in(10)

            async def request(value: int) -> np.ndarray:
                time.sleep(0.005)  # blocks the loop, like Python-level request parsing
                return await batcher.submit(tagged(value), deadline)

            results = await asyncio.gather(*(request(v) for v in range(20)))
        return model, results

    model, results = run(scenario)
    assert model.batches[0] == [0]
    assert sorted(v for batch in model.batches for v in batch) == list(range(20))
    assert [r.tolist() for r in results] == [[[float(v)]] for v in range(20)]


def test_waits_for_requests_that_are_being_decoded():
    async def scenario():
        model = EchoModel()
        async with started(model, max_batch_size=8, max_latency_ms=5_000, max_queue=10) as batcher:
            deadline = await deadline_in(10)
            with batcher.incoming():  # a second request is being decoded
                first = asyncio.create_task(batcher.submit(tagged(1), deadline))
                await asyncio.sleep(0.05)
                second = asyncio.create_task(batcher.submit(tagged(2), deadline))
                await asyncio.sleep(0)
            results = await asyncio.gather(first, second)
        return model, results

    model, results = run(scenario)
    assert model.batches == [[1, 2]]
    assert [r.tolist() for r in results] == [[[1.0]], [[2.0]]]


def test_full_queue_is_refused_at_once_with_retry_after_and_service_recovers():
    async def scenario():
        gate = threading.Event()
        model = EchoModel(gate)
        async with started(model, max_batch_size=1, max_latency_ms=0, max_queue=2) as batcher:
            deadline = await deadline_in(10)
            running = asyncio.create_task(batcher.submit(tagged(1), deadline))
            await wait_until_started(model)  # the model holds request 1; the queue is empty again
            queued = [asyncio.create_task(batcher.submit(tagged(v), deadline)) for v in (2, 3)]
            await asyncio.sleep(0)
            with pytest.raises(ApiError) as refused:
                await batcher.submit(tagged(4), deadline)
            with pytest.raises(ApiError) as refused_early:  # what routes ask before reading a body
                batcher.admit()
            gate.set()
            answered = await asyncio.gather(running, *queued)
            after = await batcher.submit(tagged(5), await deadline_in(10))
        batcher.admit()  # room again
        return refused.value, refused_early.value, answered, after

    refused, refused_early, answered, after = run(scenario)
    assert (refused.status, refused.code) == (503, "queue_full")
    assert (refused_early.status, refused_early.code) == (503, "queue_full")
    assert int(refused.headers["Retry-After"]) >= 1
    assert [a.tolist() for a in answered] == [[[1.0]], [[2.0]], [[3.0]]]
    assert after.tolist() == [[5.0]]


def test_past_its_deadline_a_request_gets_504_and_is_never_run():
    async def scenario():
        gate = threading.Event()
        model = EchoModel(gate)
        async with started(model, max_batch_size=1, max_latency_ms=0, max_queue=10) as batcher:
            running = asyncio.create_task(batcher.submit(tagged(1), await deadline_in(10)))
            await wait_until_started(model)
            with pytest.raises(ApiError) as late:
                await batcher.submit(tagged(99), await deadline_in(0.05))
            gate.set()
            await running
            # Batching goes on after skipping it.
            await batcher.submit(tagged(2), await deadline_in(10))
        return model, late.value

    model, late = run(scenario)
    assert (late.status, late.code) == (504, "deadline_exceeded")
    assert model.batches == [[1], [2]]


def test_a_split_request_past_its_deadline_leaves_no_unretrieved_failures():
    async def scenario():
        loop = asyncio.get_running_loop()
        reported = []
        loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
        gate = threading.Event()
        model = EchoModel(gate)
        async with started(model, max_batch_size=1, max_latency_ms=0, max_queue=10) as batcher:
            with pytest.raises(ApiError) as late:  # three parts; the first one runs past the deadline
                await batcher.submit(tagged(1, count=3), await deadline_in(0.05))
            code = late.value.code
            del late  # its traceback holds the request's parts
            gate.set()
            await batcher.submit(tagged(7), await deadline_in(10))
        gc.collect()  # an unretrieved exception is reported when its future is collected
        await asyncio.sleep(0)
        return model, code, reported

    model, code, reported = run(scenario)
    assert code == "deadline_exceeded"
    assert model.batches == [[1], [7]]  # the parts that had not started were skipped
    assert reported == []


def test_a_failing_batch_fails_only_its_requests():
    async def scenario():
        model = EchoModel(fail_on=66)
        async with started(model, max_batch_size=1, max_latency_ms=0, max_queue=10) as batcher:
            deadline = await deadline_in(10)
            outcomes = await asyncio.gather(
                batcher.submit(tagged(66), deadline),
                batcher.submit(tagged(3), deadline),
                return_exceptions=True,
            )
        return outcomes

    failed, fine = run(scenario)
    assert isinstance(failed, RuntimeError)
    assert fine.tolist() == [[3.0]]


def test_submit_before_start_is_refused_as_not_ready():
    async def scenario():
        batcher = Batcher(EchoModel(), max_batch_size=1, max_latency_ms=0, max_queue=10)
        with pytest.raises(ApiError) as refused:
            await batcher.submit(tagged(1), await deadline_in(1))
        return refused.value

    assert run(scenario).status == 503


def test_model_instances_run_batches_side_by_side():
    async def scenario():
        both_running = threading.Barrier(2, timeout=5)  # broken (an error) unless two calls meet inside the model

        def model(pixels: np.ndarray) -> np.ndarray:
            both_running.wait()
            return pixels[:, 0, 0, :1].astype(np.float32)

        async with started(model, max_batch_size=1, max_latency_ms=0, max_queue=10, model_instances=2) as batcher:
            deadline = await deadline_in(10)
            results = await asyncio.gather(batcher.submit(tagged(1), deadline), batcher.submit(tagged(2), deadline))
        return results

    assert [r.tolist() for r in run(scenario)] == [[[1.0]], [[2.0]]]


def test_a_free_instance_waits_for_a_fuller_batch_while_another_call_runs():
    async def scenario():
        gate = threading.Event()
        model = EchoModel(gate)
        async with started(model, max_batch_size=4, max_latency_ms=200, max_queue=10, model_instances=2) as batcher:
            deadline = await deadline_in(10)
            first = asyncio.create_task(batcher.submit(tagged(1), deadline))
            await wait_until_started(model)  # the first instance holds request 1 (an idle model starts at once)
            waiting = [asyncio.create_task(batcher.submit(tagged(v), deadline)) for v in (2, 3)]
            await asyncio.sleep(0.05)
            queued_after_50ms = batcher.queued_images  # the second instance is waiting for more
            more = [asyncio.create_task(batcher.submit(tagged(v), deadline)) for v in (4, 5)]  # now a full batch
            await asyncio.sleep(0.05)
            queued_when_full = batcher.queued_images
            gate.set()
            results = await asyncio.gather(first, *waiting, *more)
            lone = await batcher.submit(tagged(6), deadline)  # both idle: no wait
        return model, queued_after_50ms, queued_when_full, results, lone

    model, queued_after_50ms, queued_when_full, results, lone = run(scenario)
    assert (queued_after_50ms, queued_when_full) == (2, 0)
    assert sorted(model.batches) == [[1], [2, 3, 4, 5], [6]]
    assert [r.tolist() for r in results] == [[[float(v)]] for v in range(1, 6)]
    assert lone.tolist() == [[6.0]]


def test_a_free_instance_stops_waiting_when_the_latency_budget_is_spent():
    async def scenario():
        gate = threading.Event()
        model = EchoModel(gate)
        async with started(model, max_batch_size=4, max_latency_ms=50, max_queue=10, model_instances=2) as batcher:
            deadline = await deadline_in(10)
            first = asyncio.create_task(batcher.submit(tagged(1), deadline))
            await wait_until_started(model)
            second = asyncio.create_task(batcher.submit(tagged(2), deadline))
            await asyncio.sleep(0.5)  # far past the budget; the first call still runs
            queued = batcher.queued_images
            gate.set()
            results = await asyncio.gather(first, second)
        return queued, results

    queued, results = run(scenario)
    assert queued == 0  # request 2 went to the second instance alone
    assert [r.tolist() for r in results] == [[[1.0]], [[2.0]]]


def test_a_stuck_model_answers_504_frees_the_queue_and_shows_how_long_it_is_stuck_until_it_recovers():
    async def scenario():
        gate = threading.Event()
        model = EchoModel(gate)
        async with started(model, max_batch_size=1, max_latency_ms=0, max_queue=3) as batcher:
            loop = asyncio.get_running_loop()
            stuck = asyncio.create_task(batcher.submit(tagged(1), deadline=loop.time() + 0.2))
            await asyncio.to_thread(model.started.wait, 5)
            # Three more fill the queue behind the stuck call; the next one is refused.
            waiting = [asyncio.create_task(batcher.submit(tagged(2 + i), deadline=loop.time() + 0.2)) for i in range(3)]
            await asyncio.sleep(0.01)
            assert batcher.queued_images == 3
            with pytest.raises(ApiError) as full:
                batcher.admit()
            assert full.value.code == "queue_full"
            # At the deadline every request gets 504 and the queue is free again, though the model is still stuck.
            outcomes = await asyncio.gather(stuck, *waiting, return_exceptions=True)
            assert [o.code for o in outcomes] == ["deadline_exceeded"] * 4
            assert batcher.queued_images == 0
            batcher.admit(3)
            assert batcher.stalled_for() >= 0.2
            # Unstuck: the stale queue entries are skipped, and a new request is answered.
            gate.set()
            answer = await batcher.submit(tagged(9), deadline=loop.time() + 5)
            assert answer[0, 0] == 9 and batcher.stalled_for() == 0
            assert model.batches == [[1], [9]]

    run(scenario)
