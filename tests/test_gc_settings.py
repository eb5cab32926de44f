"""The serving process's garbage-collector settings: what is alive is frozen, young garbage gets more room."""

from __future__ import annotations

import gc

from service import gc_settings


def test_settle_freezes_what_is_alive_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        survivor = [object() for _ in range(10)]  # alive at settle time: frozen, never walked again
        gc_settings.settle()
        assert gc.get_freeze_count() >= len(survivor)
        assert gc.get_threshold() == (gc_settings.YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
