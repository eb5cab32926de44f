"""Batch scoring engines, by name: each turns a stream of records into output rows, in input order.

- local: a pool of decoding workers feeding one Predictor in this process (batch/engines/local.py).
- ray: Ray Data `map_batches` over an actor pool of predictors (batch/engines/ray.py).
- url: a running service's POST /classify_batch (batch/engines/remote.py).
"""

from __future__ import annotations

import importlib

from batch.engines.base import Engine, EngineSettings

# name -> (module, class); imported on use, since Ray and httpx are optional and heavy.
ENGINES: dict[str, tuple[str, str]] = {
    "local": ("batch.engines.local", "LocalEngine"),
    "ray": ("batch.engines.ray", "RayEngine"),
    "url": ("batch.engines.remote", "RemoteEngine"),
}


def create_engine(name: str, settings: EngineSettings) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}")
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)(settings)
