"""The serving model: a verified package, its runtime, the adaptive batcher and the decode step, behind one object.

Every HTTP route (the service's own and the Open Inference Protocol's) uses a Classifier; none touches the
runtime directly, so every inference path goes through the same batching, limits and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from inference.imaging import ImageDecodeError, OpenedImage, open_image, to_pixels
from inference.package import ModelPackage, load_package
from inference.runtime import Predictor
from service import gc_settings
from service.batcher import Batcher
from service.errors import ApiError
from service.metrics import service_metrics
from service.settings import ServiceSettings
from service.uploads import UploadBudget

log = logging.getLogger(__name__)

# Requests whose images' headers declare at most this many pixels in total are decoded on the event loop (see
# Classifier.decode_many; benchmarks/results/decode.md); more goes to the decode threads.
INLINE_DECODE_MAX_PIXELS = 128 * 128


def resolve_package(model: str) -> ModelPackage:
    """A package folder, else a BentoML model-store tag whose files are a package; verified (sha256) either way."""
    if Path(model).is_dir():
        return load_package(model)
    if "/" in model or "\\" in model:
        raise FileNotFoundError(f"model package folder {model} does not exist")
    import bentoml  # only for store tags; a folder needs no BentoML

    try:
        stored = bentoml.models.get(model)
    except bentoml.exceptions.BentoMLException as exc:  # NotFound, or a malformed tag
        raise FileNotFoundError(
            f"model {model!r} is neither a package folder nor a tag in the BentoML model store ({exc})"
        ) from None
    return load_package(stored.path)


class Classifier:
    """Load + verify the package, create the runtime, warm up, and serve `infer` through the batcher."""

    def __init__(
        self, settings: ServiceSettings, package: ModelPackage | None = None, uploads: UploadBudget | None = None
    ) -> None:
        """`uploads`: the worker's budget of bodies being received, shared by every model it serves."""
        self.settings = settings
        self.package = package or resolve_package(settings.model)
        self.spec = self.package.spec
        self.predictor = Predictor(
            self.package,
            backend=settings.backend,
            device=settings.device,
            intra_op_threads=settings.threads_per_instance,
            tf32=settings.tf32,
        )
        self.info = self.predictor.info
        self.metrics = service_metrics()
        self.metrics.set_runtime(
            self.package.name,
            self.package.version,
            self.info.backend,
            self.info.provider,
            self.info.device,
            self.info.requested_device,
            self.info.fallback_reason is not None,
        )
        self.batcher = Batcher(
            self.predictor.predict,
            max_batch_size=settings.max_batch_size,
            max_latency_ms=settings.max_latency_ms,
            max_queue=settings.max_queue,
            model_instances=settings.model_instances,
            labels=(self.package.name, self.package.version),
        )
        self._decode_pool: ThreadPoolExecutor | None = None
        self.uploads = uploads or UploadBudget(settings.max_upload_bytes_in_flight)
        # Growth of the process's resident memory while this version loaded and warmed up (service.repository
        # measures it); None when nobody measured.
        self.memory_bytes: int | None = None
        self._warmed_up = False
        self._warming_up = False
        self._ready_event = asyncio.Event()  # set once warmed up: requests that arrived during warm-up wait for it
        self.failure: str | None = None  # why warm-up failed; the service then reports itself dead

    @property
    def ready(self) -> bool:
        """Checksums verified and session created (in __init__), warm-up batches run, batcher running, and no model
        call stuck for longer than a request may wait (a load balancer then sends traffic elsewhere)."""
        return (
            self._warmed_up and self.batcher.running and self.batcher.stalled_for() <= self.settings.request_timeout_s
        )

    @property
    def warming_up(self) -> bool:
        return self._warming_up

    async def wait_until_warm(self, timeout_s: float) -> None:
        """Return once warm-up has finished (or failed, or `timeout_s` passed): a request that arrives while a new
        worker warms up, as after a crashed worker's restart, is served late rather than refused."""
        if self._warming_up:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready_event.wait(), timeout_s)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    async def start(self, settle_gc: bool = True) -> None:
        """Start batching and warm up before declaring readiness: at batch 1 and at the largest batch on the CPU,
        at every batch size the batcher can form on a GPU.

        `settle_gc`: then freeze what is alive out of the garbage collector's reach (service.gc_settings); a version
        loaded while serving skips it, since a full collection on the event loop would stall the requests in flight
        and a frozen version could never be collected once unloaded.
        """
        self.batcher.start()
        self._warming_up = True
        loop = asyncio.get_running_loop()
        largest = self.settings.max_batch_size
        # On a GPU each new input shape makes cuDNN search its convolution algorithms (ONNX Runtime's default
        # search is exhaustive): paid here, not by the first requests that happen to form that batch size.
        sizes = range(1, largest + 1) if self.info.device == "cuda" else sorted({1, largest})
        try:
            for batch_size in sizes:
                await loop.run_in_executor(self._pool(), self.predictor.warm_up, batch_size)
        except Exception as exc:
            self.failure = f"warm-up failed: {exc}"
            log.exception("model warm-up failed; the service stays unready")
        else:
            self._warmed_up = True
            if settle_gc:
                gc_settings.settle()  # freeze what is alive now, and let each request's garbage die young
            log.info(
                "model %s %s ready: backend=%s provider=%s device=%s",
                self.package.name,
                self.package.version,
                self.info.backend,
                self.info.provider,
                self.info.device,
            )
        finally:
            self._warming_up = False
            self._ready_event.set()

    async def stop(self) -> None:
        self._warmed_up = False
        await self.batcher.stop()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self._decode_pool = None

    def _pool(self) -> ThreadPoolExecutor:
        # Decoding runs off the event loop; one thread per core of this worker (Pillow releases the GIL).
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(
                max_workers=self.settings.threads_per_worker, thread_name_prefix="decode"
            )
        return self._decode_pool

    async def decode_many(self, images: list[bytes]) -> list[np.ndarray | ApiError]:
        """Decode each image; each entry is the pixels or that image's own error.

        Headers are read right here, so a bad format or size is refused without a thread hop.
        Small images are then decoded here too: mostly Python work under the GIL, cheaper than a hop to a
        thread. Anything bigger is decoded in the thread pool, in parallel, so that the event loop keeps
        serving while Pillow decodes and resizes (it releases the GIL for that).
        """
        opened = [self._open_or_error(data) for data in images]
        pixels = sum(image.pixel_count for image in opened if isinstance(image, OpenedImage))
        if pixels <= INLINE_DECODE_MAX_PIXELS:
            return [self._finish_or_error(image) for image in opened]
        loop = asyncio.get_running_loop()
        with self.batcher.incoming():
            return list(
                await asyncio.gather(
                    *(loop.run_in_executor(self._pool(), self._finish_or_error, image) for image in opened)
                )
            )

    def _open_or_error(self, data: bytes) -> OpenedImage | ApiError:
        try:
            return open_image(data, max_pixels=self.settings.max_image_pixels)
        except ImageDecodeError as exc:
            return ApiError.from_decode_error(exc)

    def _finish_or_error(self, image: OpenedImage | ApiError) -> np.ndarray | ApiError:
        if isinstance(image, ApiError):
            return image
        try:
            return to_pixels(image, self.spec.input_size)
        except ImageDecodeError as exc:
            return ApiError.from_decode_error(exc)

    async def run_in_pool(self, function, *args):
        """Run CPU work of a request (parsing, base64) off the event loop, in the decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool(), function, *args)

    async def infer(self, pixels: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, C) float32 probabilities via the batcher.

        `deadline` is an event-loop time (loop.time()); by default the request timeout from now.
        Raises ApiError: 400 for a wrong shape/dtype or too many images, 503 (Retry-After) when the queue is
        full or the model is not ready, 504 past the deadline.
        """
        started = time.perf_counter_ns()
        statistics = self.batcher.statistics  # the v2 statistics extension's success and fail counts
        try:
            probabilities = await self._infer(pixels, deadline)
        except Exception:
            statistics.record_failure(time.perf_counter_ns() - started)
            raise
        statistics.record_success(time.perf_counter_ns() - started)
        return probabilities

    async def _infer(self, pixels: np.ndarray, deadline: float | None) -> np.ndarray:
        try:
            self.predictor.check_input(pixels)
        except ValueError as exc:
            raise ApiError("invalid_input", str(exc)) from None
        if len(pixels) > self.settings.max_batch_images:
            raise ApiError(
                "too_many_images",
                f"{len(pixels)} images in one request; the limit is {self.settings.max_batch_images}",
            )
        if not self.ready:
            raise ApiError("not_ready", "the model is still warming up", {"Retry-After": "1"})
        if deadline is None:
            deadline = self.settings.request_deadline()
        return await self.batcher.submit(pixels, deadline)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[dict[str, Any]]:
        """One image's (C,) probabilities -> the k most likely classes, most likely first (ties: lower index)."""
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [
            {
                "label": self.spec.class_names[i],
                "index": int(i),
                "probability": float(probabilities[i]),
            }
            for i in order
        ]

    def check_top_k(self, value: Any) -> int:
        """A client's top_k (int or numeric string) -> int in 1..num_classes, else ApiError 400."""
        try:
            k = int(value)
            if isinstance(value, float) or str(value).strip() != str(k):
                raise ValueError
        except (TypeError, ValueError):
            raise ApiError("invalid_top_k", f"top_k must be an integer, got {value!r}") from None
        if not 1 <= k <= self.num_classes:
            raise ApiError("invalid_top_k", f"top_k must be between 1 and {self.num_classes}, got {k}")
        return k

    @property
    def default_top_k(self) -> int:
        return min(5, self.num_classes)

    def metadata(self) -> dict[str, Any]:
        height, width = self.spec.input_size
        return {
            "name": self.package.name,
            "version": self.package.version,
            "arch": self.spec.arch,
            "classes": list(self.spec.class_names),
            # "flip": the graph averages each image with its mirror (twice the compute per image).
            "test_time_augmentation": self.package.manifest.get("test_time_augmentation", "none"),
            "input": {
                "height": height,
                "width": width,
                "channels": 3,
                "dtype": "uint8",
                "layout": self.spec.layout,
            },
            "sha256": self.package.sha256(self.info.backend),
            "backend": self.info.backend,
            "execution_provider": self.info.provider,
            "device": self.info.device,
            "requested_device": self.info.requested_device,
            "fallback_reason": self.info.fallback_reason,
            "intra_op_threads": self.info.intra_op_threads,
            "tf32": self.info.tf32,
            "batching": {
                "max_batch_size": self.settings.max_batch_size,
                "max_latency_ms": self.settings.max_latency_ms,
                "max_queue": self.settings.max_queue,
                "model_instances": self.settings.model_instances,
            },
            "limits": {
                "max_body_bytes": self.settings.max_body_bytes,
                "max_image_pixels": self.settings.max_image_pixels,
                "max_batch_images": self.settings.max_batch_images,
                "request_timeout_s": self.settings.request_timeout_s,
            },
            "ready": self.ready,
            # The worker's RSS growth while this version loaded and warmed up (null if not measured).
            "memory_bytes": self.memory_bytes,
        }
