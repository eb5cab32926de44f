"""Coverage-guided fuzzing (atheris) of the parsers below HTTP, each for a bounded time; any exception other than the
parser's own refusal is a crash, saved under the crash folder to become a regression test.

    python -m benchmarks.fuzz [--seconds 60] [--targets image json_image base64 oip multipart]

Targets: `image` (inference.imaging.decode_image: every format's header and decoder), `json_image` (the /classify
JSON body), `base64`, `oip` (a v2 infer body with the binary extension's header length), `multipart` (the
multipart reader of /classify and /classify_batch). Results: benchmarks/results/fuzz.md and .json beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine, run_and_report

CRASHES = Path(__file__).resolve().parents[1] / ".cache" / "fuzz" / "crashes"
TARGETS = ("image", "json_image", "base64", "oip", "multipart")
INPUT_SIZE = (32, 32)
MAX_PIXELS = 1_000_000  # small, so that the fuzzer spends its time on parsing rather than decoding big images
MULTIPART_BOUNDARY = b"fuzzboundary"


def seeds(target: str) -> list[bytes]:
    """Valid inputs of each target, for the fuzzer to mutate from."""
    from PIL import Image

    images = []
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    for image_format, mode in (("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("WEBP", "RGB"), ("JPEG", "CMYK")):
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, format=image_format)
        images.append(buffer.getvalue())
    jpeg = images[0]
    encoded = base64.b64encode(jpeg).decode()
    infer = {"id": "a", "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
    binary = {"inputs": [{"name": "pixels", "shape": [1, 2, 2, 3], "datatype": "UINT8",
                          "parameters": {"binary_data_size": 12}}], "outputs": [{"name": "probabilities"}]}  # fmt: skip
    binary_json = json.dumps(binary).encode()
    part = (
        b"--" + MULTIPART_BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--" + MULTIPART_BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="top_k"\r\n\r\n3\r\n--' + MULTIPART_BOUNDARY + b"--\r\n"
    )
    return {
        "image": images,
        "json_image": [json.dumps({"image": encoded, "top_k": 3}).encode(), b'{"image": "data:image/png;base64,AAAA"}'],
        "base64": [encoded.encode(), b"data:image/jpeg;base64," + encoded.encode()],
        # The first four bytes are the binary extension's header length (decimal, or "none").
        "oip": [b"none" + json.dumps(infer).encode(), f"{len(binary_json):04d}".encode() + binary_json + bytes(12)],
        "multipart": [part],
    }[target]


def one_input(target: str):
    """The fuzzed function of `target`: bytes -> None, raising only on a crash."""
    from inference.imaging import ImageDecodeError, decode_image
    from service.classify_routes import parse_json_image
    from service.errors import ApiError
    from service.oip import InputLimits, parse_infer_request, split_body
    from service.request_reading import decode_base64, read_form
    from service.uploads import UploadBudget

    refusals = (ApiError, ImageDecodeError)
    limits = InputLimits(INPUT_SIZE, max_images=8, max_image_bytes=1 << 20)

    def image(data: bytes) -> None:
        pixels = decode_image(data, INPUT_SIZE, max_pixels=MAX_PIXELS)
        assert pixels.shape == (*INPUT_SIZE, 3) and pixels.dtype == np.uint8

    def oip(data: bytes) -> None:
        header = data[:4].decode("latin-1")
        body, binary = split_body(data[4:], None if header == "none" else header)
        parse_infer_request(body, limits, binary)

    def multipart(data: bytes) -> None:
        from starlette.requests import Request

        content_type = b"multipart/form-data; boundary=" + MULTIPART_BOUNDARY

        async def receive():
            return {"type": "http.request", "body": data, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", content_type)]}
        # The whole body comes in one message, so the deadline is never consulted.
        no_deadline = float("inf")
        asyncio.run(read_form(Request(scope, receive), 1 << 20, UploadBudget(1 << 22), no_deadline, max_files=8))

    functions = {
        "image": image,
        "json_image": parse_json_image,
        "base64": lambda data: decode_base64(data.decode("latin-1")),
        "oip": oip,
        "multipart": multipart,
    }
    function = functions[target]

    def test_one_input(data: bytes) -> None:
        with contextlib.suppress(refusals):
            function(data)

    return test_one_input


def fuzz_child(target: str, seconds: int, corpus: Path, crashes: Path) -> None:
    """Run in a child process: atheris over `target` until the time is up (libFuzzer exits the process)."""
    import atheris

    with atheris.instrument_imports(include=["inference", "service", "PIL", "simplejpeg", "starlette", "multipart"]):
        test_one_input = one_input(target)
    crashes.mkdir(parents=True, exist_ok=True)
    atheris.Setup(
        [sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-artifact_prefix={crashes}/", "-rss_limit_mb=4096"],
        test_one_input,
    )
    atheris.Fuzz()


def fuzz(target: str, seconds: int) -> dict:
    """Fuzz one target in a child process; its runs, coverage and crash files."""
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder)
        for i, seed in enumerate(seeds(target)):
            (corpus / f"seed-{i}").write_bytes(seed)
        crashes = CRASHES / target
        before = set(crashes.glob("*")) if crashes.exists() else set()
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.fuzz", "--child", target, "--seconds", str(seconds),
             "--corpus", str(corpus)],
            capture_output=True, text=True, timeout=seconds + 300,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        corpus_size = len(list(corpus.iterdir()))
    log = child.stdout + child.stderr
    runs = re.findall(r"Done (\d+) runs in (\d+) second", log)
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", log)
    new_crashes = (
        sorted(str(p.relative_to(CRASHES)) for p in set(crashes.glob("*")) - before) if crashes.exists() else []
    )
    return {
        "target": target,
        "seconds": round(elapsed, 1),
        "runs": int(runs[-1][0]) if runs else None,
        "coverage": int(coverage[-1][0]) if coverage else None,
        "features": int(coverage[-1][1]) if coverage else None,
        "corpus": corpus_size,
        "exit_code": child.returncode,
        "crashes": new_crashes,
        "log_tail": log[-1500:] if child.returncode != 0 or not runs else "",
    }


def run(args: argparse.Namespace) -> dict:
    results = {
        "command": "python -m benchmarks.fuzz " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "targets": [],
    }
    for target in args.targets:
        result = fuzz(target, args.seconds)
        print(
            f"[{target}] {result['runs']} runs in {result['seconds']} s, {len(result['crashes'])} crashes", flush=True
        )
        results["targets"].append(result)
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Fuzzing the parsers below HTTP (atheris, coverage-guided)",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), Python {m['python']}; load average at start "
        f"{m['load_average_at_start']}",
        "",
        "A crash is any exception other than the parser's own refusal (ApiError, ImageDecodeError): the service "
        "would answer it with a 500. Crash inputs are kept under .cache/fuzz/crashes and become regression tests.",
        "",
        "| target | time | inputs run | coverage (edges) | features | corpus | crashes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in results["targets"]:
        crashes = ", ".join(f"`{c}`" for c in t["crashes"]) or "0"
        lines.append(
            f"| {t['target']} | {t['seconds']:.0f} s | {t['runs']} | {t['coverage']} | {t['features']} | {t['corpus']} "
            f"| {crashes} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default %(default)s)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="what to fuzz")
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz.md", help="markdown report (JSON beside it)")
    parser.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        fuzz_child(args.child, args.seconds, args.corpus, CRASHES / args.child)
        return 0
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
