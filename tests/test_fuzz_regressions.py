"""Inputs the fuzzer (benchmarks/fuzz.py) found crashing a parser: each must now be refused as bad input by the same
target function the fuzzer ran (tests/fuzz_inputs/<target>-<what>)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fuzz import TARGETS, one_input, seeds
from service.errors import ApiError
from service.oip import split_body
from service.request_reading import parse_length

FOUND = Path(__file__).resolve().parent / "fuzz_inputs"


@pytest.mark.parametrize("path", sorted(FOUND.iterdir()), ids=lambda p: p.name)
def test_a_crash_the_fuzzer_found_is_now_a_refusal(path):
    target = path.name.split("-", 1)[0]
    one_input(target)(path.read_bytes())  # raises on a crash; a refusal (ApiError, ImageDecodeError) passes


@pytest.mark.parametrize("value", ["¹156", "٣", "1_000", "+5", "-1", " ", "0x10", "1e3"])
def test_a_length_header_takes_ascii_digits_only(value):
    assert parse_length(value) is None
    with pytest.raises(ApiError) as refused:
        split_body(b'{"inputs": []}', value)
    assert refused.value.code == "invalid_request"


def test_lengths_in_ascii_digits_still_parse():
    assert parse_length(" 42 ") == 42
    assert split_body(b"{}abc", "2") == (b"{}", b"abc")


@pytest.mark.parametrize("target", TARGETS)
def test_every_fuzz_target_accepts_its_own_seeds(target):
    for seed in seeds(target):
        one_input(target)(seed)
