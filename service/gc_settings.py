"""The garbage collector's settings for a serving process, applied once it has started and warmed up.

Every request leaves objects in reference cycles that stay alive while it is in flight; with CPython's default
thresholds they survive the young collections and die in the oldest generation, whose collections walk every
long-lived object on the event loop. So:

- gc.freeze() moves everything alive after start-up (modules, the framework, the model session) out of the
  collector's reach for good;
- a young-generation threshold of YOUNG_THRESHOLD allocations instead of 700 lets a request's cycles die young, in
  the cheap collections, for a young generation of at most a few MB.

benchmarks/results/service_cpu.md measures the no-op endpoint with and without these settings (`noop-tuned`).
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
