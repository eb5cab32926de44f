"""The local engine: a pool of decoding workers (processes by default, or threads) reads and decodes chunks of
`batch_size` records while the main thread runs each decoded chunk through one Predictor (ONNX Runtime, CUDA with
the checked CPU fallback, or TorchScript): decoding overlaps inference. Each chunk is decoded as one task per
worker, so that every worker shares a chunk of large photos instead of one worker decoding it alone.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from batch.engines.base import EngineSettings, batched, ordered_map
from batch.inputs import Record
from batch.scoring import ScoreRow, decode_chunk, merge, score_chunk
from inference.runtime import Predictor

log = logging.getLogger(__name__)


POOLS = ("process", "thread")


class InlineExecutor(Executor):
    """Runs each task at submit time, in the caller's thread: `--workers 0`."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def decode_pool(pool: str, workers: int) -> Executor:
    if workers == 0:
        return InlineExecutor()
    pools: dict[str, Callable[[], Executor]] = {
        # spawn, not fork: the parent holds ONNX Runtime's and tqdm's threads, which fork does not copy safely.
        "process": lambda: ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")),
        "thread": lambda: ThreadPoolExecutor(workers, thread_name_prefix="decode"),
    }
    if pool not in pools:
        raise ValueError(f"unknown decoding pool {pool!r}; valid: {', '.join(pools)}")
    return pools[pool]()


class LocalEngine:
    """Decoding workers feeding one Predictor in this process."""

    def __init__(self, settings: EngineSettings) -> None:
        assert settings.package is not None
        self.settings = settings
        self.package = settings.package

    def __enter__(self) -> LocalEngine:
        s = self.settings
        self.predictor = Predictor(
            self.package, backend=s.backend, device=s.device, intra_op_threads=s.threads, tf32=s.tf32
        )
        self.predictor.warm_up(s.batch_size)
        info = self.predictor.info
        log.info(
            "local engine: %s on %s (%s, %d threads), %d %s decoding workers",
            info.backend,
            info.device,
            info.provider,
            info.intra_op_threads,
            s.workers,
            s.pool,
        )
        self.pool = decode_pool(s.pool, s.workers)
        # Start every worker now (processes spawn lazily) so that their start-up counts as setup.
        empty = functools.partial(decode_chunk, size=self.package.spec.input_size)
        for future in [self.pool.submit(empty, []) for _ in range(max(1, s.workers))]:
            future.result()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.pool.shutdown(cancel_futures=True)

    def score(self, records: Iterable[Record]) -> Iterator[list[ScoreRow]]:
        s = self.settings
        spec = self.package.spec
        decode = functools.partial(decode_chunk, size=spec.input_size, max_pixels=s.max_pixels)
        parts = max(1, s.workers)
        tasks = (part for chunk in batched(records, s.batch_size) for part in split(chunk, parts))
        # Enough chunks in flight to keep every worker busy while the main thread runs a batch.
        window = (2 * parts + 1) * parts
        for decoded_parts in batched(ordered_map(self.pool, decode, tasks, window), parts):
            yield score_chunk(self.predictor, merge(decoded_parts), s.top_k)


def split(records: list[Record], parts: int) -> list[list[Record]]:
    """`parts` contiguous slices of `records`, sizes differing by at most one (some empty when it is short)."""
    return [records[index * len(records) // parts : (index + 1) * len(records) // parts] for index in range(parts)]
