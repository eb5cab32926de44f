"""The Ray engine: Ray Data `map_batches` over an actor pool of predictors built from the same model package.

Each actor loads and verifies the package, creates its Predictor once, and per batch reads + decodes the
records with the service's decode_image and runs them. Without --ray-address a local Ray instance is started
(limited to this machine's cores, no dashboard) and stopped at the end; with it the job joins that cluster.
On a cluster the model package and any input paths must be readable at the same path on every node, and
this project must be importable there (installed, or shipped with a runtime_env).

Records go to Ray in windows of WINDOW_RECORDS (ray.data.from_items keeps a window in the object store,
bytes included for archive and Parquet inputs); order is preserved so the output parts stay resumable.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from batch.engines.base import EngineError, EngineSettings, batched
from batch.inputs import Record
from batch.output import output_schema, rows_to_table
from batch.scoring import ScoreRow, decode_chunk, score_chunk
from inference.package import load_package
from inference.runtime import Predictor, cpu_threads

log = logging.getLogger(__name__)

WINDOW_RECORDS = 50_000


class ScoringActor:
    """A Ray Data callable class: pyarrow batch of records -> pyarrow batch of output rows."""

    def __init__(
        self,
        package_root: str,
        backend: str,
        device: str,
        tf32: bool,
        threads: int,
        top_k: int,
        max_pixels: int,
    ) -> None:
        package = load_package(package_root)
        self.spec = package.spec
        self.predictor = Predictor(package, backend=backend, device=device, intra_op_threads=threads, tf32=tf32)
        self.top_k = top_k
        self.max_pixels = max_pixels
        self.schema = output_schema(top_k)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = [_record(item) for item in batch.to_pylist()]
        chunk = decode_chunk(records, self.spec.input_size, self.max_pixels)
        return rows_to_table(score_chunk(self.predictor, chunk, self.top_k), self.schema, self.top_k)


def _check_listening(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once where nothing listens at a HOST:PORT (or ray://HOST:PORT) address: ray.init keeps retrying
    a dead address for minutes. Other forms ("auto") are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise EngineError(
            f"cannot join the Ray cluster at {address}: nothing answers there ({exc.strerror or exc})"
        ) from None


class RayEngine:
    def __init__(self, settings: EngineSettings) -> None:
        assert settings.package is not None
        self.settings = settings
        self.started_ray = False

    def __enter__(self) -> RayEngine:
        import ray

        s = self.settings
        if not ray.is_initialized():
            local = s.ray_address is None
            if not local:
                _check_listening(s.ray_address)
            try:
                ray.init(
                    # "local": a new instance of our own, even where `ray start` left a cluster that a bare
                    # ray.init() would join.
                    address=s.ray_address or "local",
                    num_cpus=cpu_threads() if local else None,
                    include_dashboard=False,
                    configure_logging=False,
                )
            except Exception as exc:  # ConnectionError, Ray's own errors: one line for the CLI, not a traceback
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if local:
                    raise EngineError(f"cannot start a local Ray instance: {reason}") from exc
                raise EngineError(
                    f"cannot join the Ray cluster at {s.ray_address}: {reason} (a cluster started with `ray start` "
                    "uses token authentication by default: set RAY_AUTH_MODE=token here, with the cluster's token "
                    "in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                ) from exc
            self.started_ray = True
        context = ray.data.DataContext.get_current()
        # Parts must be consecutive runs of the input order.
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # the job draws its own bar
        self.actors = max(1, s.workers)
        # One core per actor by default: actors are the parallelism, not threads inside each.
        self.threads = s.threads or 1
        log.info(
            "ray engine: %d predictor actors, %d ONNX Runtime threads each",
            self.actors,
            self.threads,
        )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()

    def score(self, records: Iterable[Record]) -> Iterator[list[ScoreRow]]:
        import ray

        s = self.settings
        for window in batched(records, WINDOW_RECORDS):
            dataset = ray.data.from_items([_item(r) for r in window]).map_batches(
                ScoringActor,
                fn_constructor_kwargs={
                    "package_root": str(s.package.root),
                    "backend": s.backend,
                    "device": s.device,
                    "tf32": s.tf32,
                    "threads": self.threads,
                    "top_k": s.top_k,
                    "max_pixels": s.max_pixels,
                },
                batch_size=s.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=self.actors),
                num_cpus=self.threads,
                # device=cuda reserves a GPU per actor; auto takes one only where Ray placed the actor on one.
                num_gpus=1 if s.device == "cuda" else 0,
            )
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield [_row(item, s.top_k) for item in table.to_pylist()]


def _item(record: Record) -> dict[str, Any]:
    reason, message = record.error or (None, None)
    return {
        "id": record.id,
        "data": record.data,
        "path": record.path,
        "root": record.root,
        "error_reason": reason,
        "error_message": message,
    }


def _record(item: dict[str, Any]) -> Record:
    error = (item["error_reason"], item["error_message"]) if item["error_reason"] is not None else None
    return Record(item["id"], data=item["data"], path=item["path"], root=item["root"], error=error)


def _row(item: dict[str, Any], k: int) -> ScoreRow:
    labels = tuple(item[f"label_{i}"] for i in range(1, k + 1) if item[f"label_{i}"] is not None)
    probabilities = tuple(item[f"probability_{i}"] for i in range(1, k + 1) if item[f"probability_{i}"] is not None)
    return ScoreRow(item["id"], labels, probabilities, item["error"], item["error_message"])
