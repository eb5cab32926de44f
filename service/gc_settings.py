"""The garbage collector's settings for a serving process, applied once it has started and warmed up.

Under load every request leaves a few dozen objects in reference cycles (the server's, BentoML's and Starlette's
per-request machinery), alive while the request is in flight. With CPython's default thresholds (700, 10, 10)
the frequent young collections find them alive and promote them, so they die in the oldest generation, whose
collections walk every long-lived object (a gc-callback probe on the small-CNN service under 32 clients, not
committed: about 0.2 ms of the event loop per request, 15%, in oldest-generation collections of ~100 ms each).

- gc.freeze() moves everything alive after start-up (modules, the framework, the model session) out of the
  collector's reach for good (an earlier probe, small CNN at 8 clients: p99 107-121 ms without it, 28-31 ms
  with it);
- a young-generation threshold of 20,000 allocations instead of 700 lets a request's cycles die young, in the
  cheap collections, for a young generation of at most a few MB. The load test of 2026-11-27 09:10 UTC
  (benchmarks/results/service_load.md, in git history) ran the no-op with and without these settings: 1,143 vs
  899 requests/s at their best concurrency.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Collect once, freeze what is alive, and raise the young generation's threshold."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
