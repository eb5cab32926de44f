"""In-process adaptive batching: concurrent requests' images are joined into one model call and split back.

One consumer task per event loop takes everything queued (up to `max_batch_size` images), runs the model in a
single dedicated thread (the loop keeps serving HTTP meanwhile) and hands each request exactly its own rows back.
Greedy: an idle model takes a lone request at once; under load, requests pile up while a batch runs, so the
next batch is bigger. It waits for more only while requests are known to be on their way (being decoded) and
the oldest queued image is younger than `max_latency_ms`.

Overload is refused, not absorbed: past `max_queue` waiting images a request fails at once with 503 and
Retry-After; a request past its deadline fails with 504, and is skipped if its batch has not started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import ApiError
from service.metrics import service_metrics

log = logging.getLogger(__name__)


@dataclass
class _Item:
    pixels: np.ndarray  # (n, H, W, 3) uint8, n <= max_batch_size
    future: asyncio.Future  # -> (n, C) float32
    deadline: float  # loop.time() after which nobody waits for it
    enqueued: float  # loop.time() when it entered the queue


class Batcher:
    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_latency_ms: float,
        max_queue: int,
    ) -> None:
        self.predict = predict  # (N, H, W, 3) uint8 -> (N, C) float32; called in one thread only
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.max_queue = max_queue
        self.metrics = service_metrics()
        self.queued_images = 0
        self._queue: collections.deque[_Item] = collections.deque()
        self._incoming = 0  # requests being decoded: images that will arrive soon
        self._changed: asyncio.Event | None = None  # set on a new item or a finished decode
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._seconds_per_image = 0.0  # running estimate, for Retry-After

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the consumer on the running event loop (BentoML's startup hook, or a test's loop)."""
        if self.running:
            return
        self._changed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ApiError(503, "shutting_down", "the service is shutting down"))
        self.queued_images = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def incoming(self) -> _Incoming:
        """`with batcher.incoming(): decode...`: tells the consumer that images are on their way, worth waiting for."""
        return _Incoming(self)

    async def submit(self, pixels: np.ndarray, deadline: float) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, C) float32 from the model, batched with other requests' images."""
        if not self.running:
            raise ApiError(503, "not_ready", "the model is not serving yet", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        count = len(pixels)
        self.admit(count)
        now = loop.time()
        items = [
            _Item(pixels[start : start + self.max_batch_size], loop.create_future(), deadline, now)
            for start in range(0, count, self.max_batch_size)
        ]
        self._queue.extend(items)
        self.queued_images += count
        self._changed.set()
        # A timer that fails the items at the deadline: cheaper per request than asyncio.wait_for + gather, which
        # wrap the futures in two more (this runs on the event loop, the service's limit for small models).
        timer = loop.call_at(deadline, self._expire, items)
        try:
            parts = [await item.future for item in items]
        finally:
            timer.cancel()
            # After the deadline or a failed part: the consumer skips whatever has not started. (cancel() on a part
            # that already failed also tells asyncio not to log its exception as never retrieved.)
            for item in items:
                item.future.cancel()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _expire(self, items: list[_Item]) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(self._deadline_error())

    def admit(self, count: int = 1) -> None:
        """Raise 503 queue_full unless `count` more images fit in the queue.

        Routes call it before reading a request's body too, so that under overload a rejection costs
        microseconds instead of a body read and a decode.
        """
        if self.queued_images + count > self.max_queue:
            raise ApiError(
                503,
                "queue_full",
                f"the service is overloaded ({self.queued_images} images waiting); retry later",
                {"Retry-After": str(self.retry_after_s())},
            )

    def retry_after_s(self) -> int:
        """Seconds until the current queue should have drained (at least 1)."""
        return max(1, math.ceil(self.queued_images * self._seconds_per_image))

    def _deadline_error(self) -> ApiError:
        return ApiError(504, "deadline_exceeded", "the request was not answered within its deadline")

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(loop)
            if batch:
                await self._run(loop, batch)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Item]:
        while not self._queue:
            self._changed.clear()
            await self._changed.wait()
        batch: list[_Item] = []
        size = 0
        wait_until = self._queue[0].enqueued + self.max_latency_s
        while True:
            # Greedy: everything already queued that fits.
            while self._queue and size + len(self._queue[0].pixels) <= self.max_batch_size:
                item = self._queue.popleft()
                self.queued_images -= len(item.pixels)
                now = loop.time()
                if item.future.done():  # its request timed out (cancelled) while queued
                    continue
                if now > item.deadline:
                    item.future.set_exception(self._deadline_error())
                    continue
                self.metrics.queue_wait_seconds.observe(now - item.enqueued)
                batch.append(item)
                size += len(item.pixels)
            full = size >= self.max_batch_size or bool(self._queue)  # the next item does not fit
            remaining = wait_until - loop.time()
            if full or not batch or self._incoming == 0 or remaining <= 0:
                return batch
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([item.pixels for item in batch])
        started = loop.time()
        try:
            probabilities = await loop.run_in_executor(self._executor, self.predict, pixels)
        except Exception as exc:  # a model failure fails this batch's requests, not the consumer
            log.exception("model call failed on a batch of %d images", len(pixels))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        elapsed = loop.time() - started
        self.metrics.inference_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(pixels))
        self._seconds_per_image = 0.9 * self._seconds_per_image + 0.1 * (elapsed / len(pixels))
        offset = 0
        for item in batch:  # rows come back in the order the images went in
            rows = probabilities[offset : offset + len(item.pixels)]
            offset += len(item.pixels)
            if not item.future.done():  # done = cancelled by its deadline meanwhile
                item.future.set_result(rows)


class _Incoming:
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def __enter__(self) -> None:
        self.batcher._incoming += 1

    def __exit__(self, *exc_info) -> None:
        self.batcher._incoming -= 1
        if self.batcher._changed is not None:
            self.batcher._changed.set()
