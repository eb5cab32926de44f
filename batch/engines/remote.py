"""The --url engine: send images in batches to a running service's POST /classify_batch, with retries.

- 429, 502, 503, 504, timeouts and connection errors are retried with exponential backoff and jitter;
  a Retry-After header (seconds) is honoured. When the retries run out the job stops with an error (the
  parts written so far stay; `--resume` continues once the service is back).
- A refusal that no retry and no smaller request changes (401/403: the API key; 404/405: the URL, the model
  or the route; 400 for top_k or the model choice) stops the job at the first request, with the service's
  message, instead of becoming an error row for every image.
- Other 4xx/5xx answers concern the whole request (too many images, body too large, one image that
  breaks the server): the batch is split in halves until the answer concerns one image, which then
  becomes an error row with the service's code.
- The job asks for one model and version throughout (the `model` and `version` query parameters): `--model NAME`,
  or the service's only model, at the version it serves by default when the job starts (GET /metadata); that
  version is part of the output's identity, so a resume after a rollout is refused instead of mixing versions.
- With VISIONSERVE_API_KEY set, every request carries `Authorization: Bearer <key>` (a service started with
  VISIONSERVE_API_KEYS_FILE wants one).
- Per-image errors in a 200 answer become error rows with the service's code and message.
- Files the client cannot read (missing, outside the input folder) are error rows and are not sent.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import httpx

from batch.engines.base import EngineError, EngineSettings, ServedModel, batched, ordered_map
from batch.inputs import Record, RecordError, read_bytes
from batch.scoring import ScoreRow

log = logging.getLogger(__name__)

ENDPOINT = "/classify_batch"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
API_KEY_VARIABLE = "VISIONSERVE_API_KEY"
# Answers about the job rather than the request's images: every request would get the same.
JOB_REFUSAL_STATUSES = frozenset({401, 403, 404, 405})
JOB_REFUSAL_CODES = frozenset({"invalid_top_k", "invalid_model_choice", "unsupported_media_type"})


class RemoteError(Exception):
    """The service stayed unreachable or overloaded through every retry."""


class JobRefused(RemoteError):
    """The service refused the job itself (its key, URL, model or top-k): no retry or smaller request helps."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # tries per request, the first included
    base_delay_s: float = 0.5  # doubled after every failed try
    max_delay_s: float = 30.0  # also the cap on a Retry-After the service asks for
    timeout_s: float = 120.0  # per request


class RemoteEngine:
    def __init__(self, settings: EngineSettings, retry: RetryPolicy = RetryPolicy()) -> None:
        assert settings.url is not None
        self.settings = settings
        self.retry = retry
        self.endpoint = service_root(settings.url) + ENDPOINT
        self.params: dict[str, Any] = {"top_k": settings.top_k}
        if settings.served is not None:  # None only for an engine used on its own (tests)
            self.params.update(model=settings.served.name, version=settings.served.version)

    def __enter__(self) -> RemoteEngine:
        workers = max(1, self.settings.workers)
        self.client = httpx.Client(
            timeout=self.retry.timeout_s, limits=httpx.Limits(max_connections=workers), headers=api_key_headers()
        )
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="request")
        log.info(
            "url engine: %s, %d concurrent requests of up to %d images",
            self.endpoint,
            workers,
            self.settings.batch_size,
        )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.pool.shutdown(cancel_futures=True)
        self.client.close()

    def score(self, records: Iterable[Record]) -> Iterator[list[ScoreRow]]:
        window = 2 * max(1, self.settings.workers)
        yield from ordered_map(self.pool, self._score_chunk, batched(records, self.settings.batch_size), window)

    def _score_chunk(self, records: list[Record]) -> list[ScoreRow]:
        rows: list[ScoreRow | None] = [None] * len(records)
        readable: list[tuple[int, Record, bytes]] = []
        for position, record in enumerate(records):
            try:
                readable.append((position, record, read_bytes(record)))
            except RecordError as exc:
                rows[position] = ScoreRow(record.id, (), (), exc.reason, str(exc))
        for (position, _, _), row in zip(readable, self._classify(readable), strict=True):
            rows[position] = row
        return rows  # type: ignore[return-value]  # every position is set above

    def _classify(self, items: list[tuple[int, Record, bytes]]) -> list[ScoreRow]:
        if not items:
            return []
        files = [
            ("images", (PurePosixPath(r.id).name or "image", data, "application/octet-stream")) for _, r, data in items
        ]
        response = self._post(files)
        if response.status_code == 200:
            return [
                _result_row(r.id, result, self.settings.top_k)
                for (_, r, _), result in zip(items, _results(response, len(items)), strict=True)
            ]
        code, message = _error_of(response)
        if response.status_code in JOB_REFUSAL_STATUSES or code in JOB_REFUSAL_CODES:
            raise JobRefused(refusal(self.endpoint, response.status_code, code, message))
        if len(items) > 1:  # a whole-request refusal: find the image (or the size) it is about
            half = len(items) // 2
            return self._classify(items[:half]) + self._classify(items[half:])
        return [ScoreRow(items[0][1].id, (), (), code, message)]

    def _post(self, files: list[Any]) -> httpx.Response:
        policy = self.retry
        for attempt in range(policy.attempts):
            backoff = min(policy.max_delay_s, policy.base_delay_s * 2**attempt) * random.uniform(0.5, 1.0)
            try:
                response = self.client.post(self.endpoint, params=self.params, files=files)
            except httpx.TransportError as exc:  # refused, reset, timed out
                problem = f"{type(exc).__name__}: {exc}"
                delay = backoff
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                problem = f"HTTP {response.status_code}"
                asked = _retry_after(response, policy.max_delay_s)
                delay = backoff if asked is None else asked
            if attempt + 1 < policy.attempts:
                log.warning("%s from %s; retrying in %.1f s", problem, self.endpoint, delay)
                time.sleep(delay)
        raise RemoteError(f"{self.endpoint} failed {policy.attempts} times, last with {problem}")


def service_root(url: str) -> str:
    """The service's address from --url, which may name the /classify_batch route itself."""
    url = url.rstrip("/")
    return url.removesuffix(ENDPOINT)


def api_key_headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_VARIABLE)
    return {"authorization": f"Bearer {key}"} if key else {}


def refusal(url: str, status: int, code: str, message: str) -> str:
    """The one line for a refusal of the whole job, with what to change where that is ours to say."""
    line = f"{url} refused the job with HTTP {status} {code}: {message}"
    if code == "invalid_model_choice":
        return f"{line} (name one with --model)"
    if code == "version_not_found":
        return f"{line} (the version this job started with is no longer served: score into a new output)"
    if status == 401:
        if not api_key_headers():
            return f"{line} (set {API_KEY_VARIABLE} to one of the service's API keys)"
        return f"{line} ({API_KEY_VARIABLE} is not one of the service's API keys)"
    return line


def served_model(url: str, name: str | None, timeout_s: float = 30.0) -> ServedModel:
    """The model the service at `url` scores with (`name`, or its only one) and that model's default version now,
    from GET /metadata: a job pins that version, so that a rollout during the job, or before a resume, cannot
    mix two versions' scores in one output."""
    address = service_root(url) + "/metadata"
    try:
        response = httpx.get(address, params={"model": name} if name else None, headers=api_key_headers(),
                             timeout=timeout_s)  # fmt: skip
    except httpx.TransportError as exc:
        raise EngineError(f"{address} cannot be reached: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        code, message = _error_of(response)
        raise JobRefused(refusal(address, response.status_code, code, message))
    try:
        metadata = response.json()
        if "version" not in metadata:  # several models served and none named: /metadata lists them
            served = sorted({entry["name"] for entry in metadata["models"]})
            raise JobRefused(f"{address}: the service serves {len(served)} models ({', '.join(served)}): name one "
                             "with --model")  # fmt: skip
        return ServedModel(str(metadata["name"]), str(metadata["version"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"{address} is not a visionserve service's /metadata: {exc!r}") from None


def _results(response: httpx.Response, expected: int) -> list[dict[str, Any]]:
    try:
        results = sorted(response.json()["results"], key=lambda r: r["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"the service's answer is not a /classify_batch result: {exc}") from None
    if [r["index"] for r in results] != list(range(expected)):
        raise RemoteError(f"the service answered {len(results)} results for {expected} images")
    return results


def _result_row(row_id: str, result: dict[str, Any], k: int) -> ScoreRow:
    if result.get("error"):
        error = result["error"]
        return ScoreRow(row_id, (), (), str(error.get("code", "error")), str(error.get("message", "")))
    predictions = result["predictions"][:k]
    return ScoreRow(
        row_id,
        tuple(p["label"] for p in predictions),
        tuple(float(p["probability"]) for p in predictions),
    )


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
        return str(body.get("code") or f"http_{response.status_code}"), str(body.get("error", response.text))
    except (ValueError, AttributeError):
        return f"http_{response.status_code}", response.text[:200]


def _retry_after(response: httpx.Response, cap_s: float) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare from services and is treated as absent)."""
    try:
        return min(cap_s, max(0.0, float(response.headers["retry-after"])))
    except (KeyError, ValueError):
        return None
