"""In-process adaptive batching: concurrent requests' images are joined into one model call and split back.

The model runs in dedicated threads (the event loop keeps serving HTTP meanwhile), at most `model_instances` calls
at a time; each request gets exactly its own rows back. Batches are started by events: a request's arrival, a
finished model call, a finished decode or the end of a wait. So an idle model takes a lone request at once, and
under load requests pile up while a batch runs and the next batch is bigger. A free model instance waits for more,
up to `max_latency_ms` after the oldest queued image arrived, only while that is worth it: requests are being
decoded (known to be on their way), or another call keeps the cores busy meanwhile. (Not a consumer task awaiting
an asyncio.Event: it would wake only after every callback already queued on the event loop, leaving the model idle
while a burst of requests is parsed.)

Overload is refused, not absorbed: past `max_queue` waiting images a request fails at once with 503 and
Retry-After; a request past its deadline fails with 504, and is skipped if its batch has not started.

Each batcher counts what the v2 statistics extension reports (service.statistics, service.oip), in Triton's terms.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import ApiError
from service.metrics import service_metrics
from service.statistics import InferenceStatistics, shared_folder

log = logging.getLogger(__name__)


@dataclass
class _Item:
    pixels: np.ndarray  # (n, H, W, 3) uint8, n <= max_batch_size
    future: asyncio.Future  # -> (n, C) float32
    deadline: float  # loop.time() after which nobody waits for it
    enqueued: float  # loop.time() when it entered the queue
    # perf_counter_ns() then, for the measured wait: uvloop's loop.time() moves in whole milliseconds.
    enqueued_ns: int
    counted: bool = True  # its images count in queued_images (until a batch takes it or its request gives up)


class Batcher:
    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_latency_ms: float,
        max_queue: int,
        model_instances: int = 1,
        labels: tuple[str, str] = ("", ""),
    ) -> None:
        self.predict = predict  # (N, H, W, 3) uint8 -> (N, C) float32; thread-safe when model_instances > 1
        self.model_instances = model_instances  # model calls that may run at once
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.max_queue = max_queue
        self.metrics = service_metrics().for_model(*labels)  # the (model, version) series this batcher observes
        self.statistics = InferenceStatistics(max_batch_size, *labels, shared_folder())
        self.queued_images = 0
        self._queue: collections.deque[_Item] = collections.deque()
        self._incoming = 0  # requests being decoded: images that will arrive soon
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None  # the model's threads; None when not running
        self._calls = 0  # model calls in flight
        self._call_starts: dict[int, float] = {}  # loop.time() each call in flight started, by call number
        self._call_number = 0
        self._wait_timer: asyncio.TimerHandle | None = None  # ends a free instance's wait for a fuller batch
        self._seconds_per_image = 0.0  # running estimate, for Retry-After

    @property
    def running(self) -> bool:
        return self._executor is not None

    def start(self) -> None:
        """Start batching on the running event loop (BentoML's startup hook, or a test's loop)."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=self.model_instances, thread_name_prefix="model")

    async def stop(self) -> None:
        """Refuse what is queued (503); a model call in flight still answers its requests."""
        executor, self._executor = self._executor, None
        self._cancel_wait()
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ApiError("shutting_down", "the service is shutting down"))
        self.queued_images = 0
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self.statistics.close()

    def incoming(self) -> _Incoming:
        """`with batcher.incoming(): decode...`: tells the batcher that images are on their way, worth waiting for."""
        return _Incoming(self)

    async def submit(self, pixels: np.ndarray, deadline: float) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, C) float32 from the model, batched with other requests' images."""
        if not self.running:
            raise ApiError("not_ready", "the model is not serving yet", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        count = len(pixels)
        self.admit(count)
        now = loop.time()
        now_ns = time.perf_counter_ns()
        items = [
            _Item(pixels[start : start + self.max_batch_size], loop.create_future(), deadline, now, now_ns)
            for start in range(0, count, self.max_batch_size)
        ]
        self._queue.extend(items)
        self.queued_images += count
        self._dispatch()
        # A timer that fails the items at the deadline: cheaper per request than asyncio.wait_for + gather, which
        # wrap the futures in two more (this runs on the event loop, the service's limit for small models).
        timer = loop.call_at(deadline, self._expire, items)
        try:
            parts = [await item.future for item in items]
        finally:
            timer.cancel()
            # After the deadline or a failed part: the batcher skips whatever has not started, and its queue slots
            # are free at once. (cancel() on a part that already failed also tells asyncio not to log its exception
            # as never retrieved.)
            for item in items:
                item.future.cancel()
                self._release(item)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _expire(self, items: list[_Item]) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(self._deadline_error())
            self._release(item)

    def _release(self, item: _Item) -> None:
        """Free a queued item's slots (and its pixels) now; the queue drops the empty item when it reaches it."""
        if item.counted:
            item.counted = False
            self.queued_images -= len(item.pixels)
            item.pixels = item.pixels[:0]

    def stalled_for(self) -> float:
        """Seconds the oldest model call in flight has been running (0 when none is): a stuck model shows here."""
        if not self._call_starts or self._loop is None:
            return 0.0
        return self._loop.time() - min(self._call_starts.values())

    def admit(self, count: int = 1) -> None:
        """Raise 503 queue_full unless `count` more images fit in the queue (routes also call it before the body)."""
        if self.queued_images + count > self.max_queue:
            raise ApiError(
                "queue_full",
                f"the service is overloaded ({self.queued_images} images waiting); retry later",
                {"Retry-After": str(self.retry_after_s())},
            )

    def retry_after_s(self) -> int:
        """Seconds until the current queue should have drained (at least 1)."""
        return max(1, math.ceil(self.queued_images * self._seconds_per_image))

    def _deadline_error(self) -> ApiError:
        return ApiError("deadline_exceeded", "the request was not answered within its deadline")

    def _dispatch(self, *, waited: bool = False) -> None:
        """Start a model call on what is queued, unless every model instance is busy or a fuller batch is worth
        waiting for (`waited`: that wait is over)."""
        if self._calls >= self.model_instances or not self.running or not self._queue:
            return
        loop = self._loop
        wait_until = self._queue[0].enqueued + self.max_latency_s
        # Images being decoded will arrive soon; a call in flight keeps the cores busy while a free instance waits
        # for a fuller batch (small batches cost more per image).
        worth_waiting = self._incoming or self._calls > 0
        if not waited and worth_waiting and self.queued_images < self.max_batch_size and loop.time() < wait_until:
            if self._wait_timer is None:
                self._wait_timer = loop.call_at(wait_until, self._end_wait)
            return
        self._cancel_wait()
        batch = self._take_batch(loop.time())
        if not batch:
            return
        joining = time.perf_counter_ns()
        pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([item.pixels for item in batch])
        started_ns = time.perf_counter_ns()
        input_ns = started_ns - joining
        self._calls += 1
        self._call_number += 1
        number = self._call_number
        self._call_starts[number] = loop.time()
        call = self._executor.submit(self.predict, pixels)
        # The answer comes back in one hop (run_in_executor's asyncio future would take two loop iterations).
        call.add_done_callback(
            lambda done: self._call_soon_threadsafe(self._finish, batch, number, started_ns, input_ns, done)
        )

    def _take_batch(self, now: float) -> list[_Item]:
        """Everything queued that fits in one batch (greedy, in order); skips requests that are gone."""
        batch: list[_Item] = []
        size = 0
        now_ns = time.perf_counter_ns()
        while self._queue and size + len(self._queue[0].pixels) <= self.max_batch_size:
            item = self._queue.popleft()
            if not item.counted:  # its request gave up (deadline, failure) while queued: slots already free
                continue
            item.counted = False
            self.queued_images -= len(item.pixels)
            if item.future.done():
                continue
            if now > item.deadline:
                item.future.set_exception(self._deadline_error())
                continue
            wait_ns = now_ns - item.enqueued_ns
            self.metrics.queue_wait_seconds.observe(wait_ns / 1e9)
            self.statistics.record_queue(wait_ns)
            batch.append(item)
            size += len(item.pixels)
        return batch

    def _call_soon_threadsafe(self, callback, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting for the answer
            self._loop.call_soon_threadsafe(callback, *args)

    def _finish(
        self, batch: list[_Item], number: int, started_ns: int, input_ns: int, call: concurrent.futures.Future
    ) -> None:
        """On the event loop: hand each request its rows (or the model's failure), then start the next batch."""
        self._calls -= 1
        self._call_starts.pop(number, None)
        try:
            probabilities = call.result()
        except Exception as exc:  # a model failure fails this batch's requests, not the batcher
            log.error(
                "model call failed on a batch of %d images", sum(len(item.pixels) for item in batch), exc_info=exc
            )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            infer_ns = time.perf_counter_ns() - started_ns
            elapsed = infer_ns / 1e9
            self.metrics.inference_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(probabilities))
            seconds_per_image = elapsed / len(probabilities) / self.model_instances  # calls run side by side
            self._seconds_per_image = 0.9 * self._seconds_per_image + 0.1 * seconds_per_image
            handing_out = time.perf_counter_ns()
            offset = 0
            for item in batch:  # rows come back in the order the images went in
                rows = probabilities[offset : offset + len(item.pixels)]
                offset += len(item.pixels)
                if not item.future.done():  # done = cancelled by its deadline meanwhile
                    item.future.set_result(rows)
            output_ns = time.perf_counter_ns() - handing_out
            self.statistics.record_execution(len(batch), len(probabilities), input_ns, infer_ns, output_ns)
        self._dispatch()

    def _end_wait(self) -> None:
        self._wait_timer = None
        self._dispatch(waited=True)

    def _cancel_wait(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None


class _Incoming:
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def __enter__(self) -> None:
        self.batcher._incoming += 1

    def __exit__(self, *exc_info) -> None:
        self.batcher._incoming -= 1
        self.batcher._dispatch()
