"""What every batch scoring engine shares: the Engine protocol, its resolved settings, and two iteration helpers.

An engine is a context manager: entering it does the setup (model load, worker start, warm-up), so that the job
can time scoring apart from setup; `score(records)` yields lists of ScoreRow in input order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from itertools import islice
from typing import Protocol, TypeVar

from batch.inputs import Record
from batch.scoring import ScoreRow
from inference.package import ModelPackage

T = TypeVar("T")
R = TypeVar("R")


class EngineError(Exception):
    """An engine could not start (e.g. the Ray cluster of --ray-address cannot be joined); the message says why."""


@dataclass(frozen=True)
class ServedModel:
    """The model a service scores a url job with, its version pinned for the whole job (and its resumes)."""

    name: str
    version: str


@dataclass(frozen=True)
class EngineSettings:
    """A job's settings as an engine needs them, every default already resolved by `batch.job` (hence none here)."""

    package: ModelPackage | None  # None only for the url engine, where the service holds the model
    top_k: int
    batch_size: int  # images per inference call (local, ray) or per request (url)
    workers: int  # decoding workers (local; 0: inline), predictor actors (ray) or concurrent requests (url)
    pool: str  # local decoding workers: process | thread
    backend: str
    device: str
    tf32: bool
    threads: int | None  # ONNX Runtime intra-op threads; None: the engine's own default
    max_pixels: int
    ray_address: str | None
    url: str | None
    served: ServedModel | None  # url engine: the model and version every request asks the service for


class Engine(Protocol):
    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def score(self, records: Iterable[Record]) -> Iterator[list[ScoreRow]]: ...


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def ordered_map(executor: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """executor.map that keeps at most `window` tasks in flight (bounded memory on endless inputs), in order."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
