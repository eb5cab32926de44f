"""The counters of Triton's statistics extension, summed over every worker process of one server.

BentoML serves with several worker processes, each with its own batchers. A client reads the statistics through
whichever worker answers; perf_analyzer reads them before and after a run and needs the second answer to include
the first (it looks for the version whose queue count grew). So each batcher keeps its counters in a small file of
int64 slots, memory-mapped and written only by its own worker, and an answer sums the files of that version.
The files live in the folder that BentoML shares between one server's workers and empties at each start (the
Prometheus multiprocess folder, PROMETHEUS_MULTIPROC_DIR); a process without it (a test, a batch job) keeps its
counters in memory alone.

As Triton counts them: `success`/`fail` one per request, its time in the model path (Classifier.infer: from its
decoded pixels to its probabilities or failure); `queue` one per request, its wait for a batch; `compute_input`
(joining the batch's images), `compute_infer` (the model call) and `compute_output` (handing each request its
rows) one per request with its batch's whole time. A request bigger than one model call counts once per part
there. Per model call: `execution_count`, `inference_count` (images) and the compute times by batch size.
Nothing is cached, so cache hits and misses stay zero.
"""

from __future__ import annotations

import collections
import itertools
import mmap
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

FOLDER_NAME = "visionserve-statistics"  # inside the Prometheus multiprocess folder

# Slots. The three compute durations share one count: perf_analyzer refuses statistics whose three counts differ,
# and a reader in another process could otherwise see one incremented before the others.
SUCCESS, FAIL, QUEUE = 0, 2, 4  # each: count, then ns
COMPUTE_COUNT, COMPUTE_NS = 6, 7  # then input, infer, output ns at 7, 8, 9
INFERENCES, EXECUTIONS, LAST_INFERENCE_MS = 10, 11, 12
PER_SIZE = 13  # per batch size b (1..max): count, then input, infer, output ns, at PER_SIZE + 4 * (b - 1)
COMPUTE_NAMES = ("compute_input", "compute_infer", "compute_output")

_instances = itertools.count()  # a worker may hold two batchers of one version while a reload retires the old one


def shared_folder() -> Path | None:
    """Where this server's workers keep their counters; None outside a BentoML server."""
    multiprocess = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(multiprocess) / FOLDER_NAME if multiprocess else None


def server_folder(bentoml_home: Path) -> Path:
    """Where the workers of the `bentoml serve` whose BENTOML_HOME is `bentoml_home` keep their counters (BentoML
    puts its Prometheus multiprocess folder there), for readers outside that server: tests, benchmarks."""
    return bentoml_home / "prometheus_multiproc_dir" / FOLDER_NAME


def read_counters(paths) -> dict[Path, np.ndarray]:
    """The counters in each of these batchers' files, leaving out a file whose batcher stopped meanwhile."""
    counters = {}
    for path in paths:
        try:
            counters[path] = np.frombuffer(path.read_bytes(), dtype=np.int64)
        except FileNotFoundError:
            continue
    return counters


def requests_by_worker(folder: Path | None = None) -> dict[int, int]:
    """Requests each worker process has answered so far (succeeded or failed), over every version it serves, by
    process id; empty outside a BentoML server."""
    folder = folder or shared_folder()
    if folder is None or not folder.is_dir():
        return {}
    totals: collections.Counter[int] = collections.Counter()
    for path, counters in read_counters(folder.glob("*/*/*")).items():
        totals[int(path.name.split("-")[0])] += int(counters[SUCCESS] + counters[FAIL])
    return dict(totals)


class InferenceStatistics:
    """One batcher's counters, updated on its worker's event loop only; `model_stats` answers for every worker."""

    def __init__(self, max_batch_size: int, name: str = "", version: str = "", folder: Path | None = None) -> None:
        size = 8 * (PER_SIZE + 4 * max_batch_size)
        self._map: mmap.mmap | None = None
        self.path: Path | None = None
        if folder is not None and name:
            # One folder per version, quoted so that any model name is one path component.
            self.path = folder / quote(name, safe="") / quote(version, safe="") / f"{os.getpid()}-{next(_instances)}"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w+b") as file:
                file.truncate(size)
                self._map = mmap.mmap(file.fileno(), size)
            self._counters = memoryview(self._map).cast("q")
        else:
            self._counters = memoryview(bytearray(size)).cast("q")

    def record_success(self, ns: int) -> None:
        self._add(SUCCESS, ns)

    def record_failure(self, ns: int) -> None:
        self._add(FAIL, ns)

    def record_queue(self, ns: int) -> None:
        self._add(QUEUE, ns)

    def _add(self, slot: int, ns: int) -> None:
        counters = self._counters
        counters[slot] += 1
        counters[slot + 1] += ns

    def record_execution(self, requests: int, images: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        counters = self._counters
        counters[EXECUTIONS] += 1
        counters[INFERENCES] += images
        counters[LAST_INFERENCE_MS] = time.time_ns() // 1_000_000
        counters[COMPUTE_NS] += input_ns * requests
        counters[COMPUTE_NS + 1] += infer_ns * requests
        counters[COMPUTE_NS + 2] += output_ns * requests
        counters[COMPUTE_COUNT] += requests
        per_size = PER_SIZE + 4 * (images - 1)
        counters[per_size + 1] += input_ns
        counters[per_size + 2] += infer_ns
        counters[per_size + 3] += output_ns
        counters[per_size] += 1

    def close(self) -> None:
        """Stop sharing: the file goes (a version unloaded and loaded again starts from zero, as in Triton), and
        a model call still finishing counts in memory."""
        if self._map is None:
            return
        counters = self._counters
        self._counters = memoryview(bytearray(counters.tobytes())).cast("q")
        counters.release()
        self._map.close()
        self._map = None
        self.path.unlink(missing_ok=True)

    def totals(self) -> np.ndarray:
        """Every worker's counters of this version, summed (the latest inference time: the latest of any)."""
        if self.path is None or self._map is None:
            return np.frombuffer(self._counters, dtype=np.int64).copy()
        rows = list(read_counters(self.path.parent.iterdir()).values())
        width = max(len(row) for row in rows)
        table = np.zeros((len(rows), width), dtype=np.int64)
        for index, row in enumerate(rows):
            table[index, : len(row)] = row
        summed = table.sum(axis=0)
        summed[LAST_INFERENCE_MS] = table[:, LAST_INFERENCE_MS].max()
        return summed

    def model_stats(self, name: str, version: str) -> dict[str, Any]:
        """One entry of the extension's `model_stats` list."""
        counters = [int(value) for value in self.totals()]

        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        compute_count = counters[COMPUTE_COUNT]
        batch_stats = []
        for start in range(PER_SIZE, len(counters), 4):
            count = counters[start]
            if count:
                batch_stats.append(
                    {"batch_size": (start - PER_SIZE) // 4 + 1}
                    | {key: duration(count, counters[start + 1 + i]) for i, key in enumerate(COMPUTE_NAMES)}
                )
        return {
            "name": name,
            "version": version,
            "last_inference": counters[LAST_INFERENCE_MS],
            "inference_count": counters[INFERENCES],
            "execution_count": counters[EXECUTIONS],
            "inference_stats": {
                "success": duration(counters[SUCCESS], counters[SUCCESS + 1]),
                "fail": duration(counters[FAIL], counters[FAIL + 1]),
                "queue": duration(counters[QUEUE], counters[QUEUE + 1]),
            }
            | {key: duration(compute_count, counters[COMPUTE_NS + i]) for i, key in enumerate(COMPUTE_NAMES)}
            | {"cache_hit": duration(0, 0), "cache_miss": duration(0, 0)},
            "batch_stats": batch_stats,
            "memory_usage": [],
        }
