"""What API keys cost: requests/s and latency with VISIONSERVE_API_KEYS_FILE set vs not, side by side in one run.

    python -m benchmarks.auth_cost [--package PKG] [--keys 100] [--rounds 5] [--seconds 10] [--concurrency 32]

Two servers of the same package (one worker each, gRPC off) run side by side; each round wrk drives one, then the
other (the order alternating by round), with single CIFAR-10 JPEGs on /classify at one concurrency, the server with
keys getting `Authorization: Bearer KEY`. The key file holds `--keys` keys, so each request hashes its key once and
compares it with every stored digest. The figure is the median over rounds of each round's keys-on / keys-off rate
(target: within 3%). The default package is the random-weight lesson CNN: the smaller the model, the larger the
check's share of a request. Run on a quiet machine: wrk and both servers share its cores.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

from benchmarks.common import (
    CACHE,
    CIFAR10_CLASSES,
    DEFAULT_ARCHIVE,
    LOGS,
    RESULTS,
    describe_package,
    machine,
    provenance,
    read_test_jpegs,
    run_and_report,
)
from benchmarks.loadgen import write_image_files, wrk_closed_loop
from benchmarks.servers import SERVICE, BentoServer
from service.auth import hash_key

TARGET_RATIO = 0.97


def write_keys(folder: Path, count: int) -> tuple[Path, str]:
    """A key file of `count` hashed keys; returns it and the one key the load presents (the last line's)."""
    keys = [secrets.token_urlsafe(32) for _ in range(count)]
    path = folder / "api-keys.txt"
    path.write_text("".join(hash_key(key) + "\n" for key in keys))
    return path, keys[-1]


def run(args: argparse.Namespace) -> dict:
    from benchmarks.random_weights import random_package

    package = args.package or random_package(CACHE, "cnn_bn", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0]
    folder = CACHE / "auth-cost"
    folder.mkdir(parents=True, exist_ok=True)
    keys_file, key = write_keys(folder, args.keys)
    listing = write_image_files(read_test_jpegs(args.data, 256), folder / "jpegs")
    # One worker each: with several, the kernel spreads wrk's connections unevenly between them, and that
    # varies more from run to run than a key check costs.
    common = {
        "VISIONSERVE_MODEL": str(package),
        "VISIONSERVE_DEVICE": "cpu",
        "VISIONSERVE_WORKERS": "1",
    }
    servers = {
        "keys off": BentoServer(SERVICE, common, LOGS, "auth-off"),
        "keys on": BentoServer(SERVICE, {**common, "VISIONSERVE_API_KEYS_FILE": str(keys_file)}, LOGS, "auth-on"),
    }
    headers = {"keys off": None, "keys on": {"Authorization": f"Bearer {key}"}}
    rounds = []
    with servers["keys off"], servers["keys on"]:
        for index in range(args.rounds):
            order = ("keys off", "keys on") if index % 2 == 0 else ("keys on", "keys off")
            figures = {}
            for label in order:
                server = servers[label]
                phase = wrk_closed_loop(
                    label, f"{server.url}/classify", listing, args.concurrency, args.seconds, 2, headers[label]
                )
                figures[label] = phase.figures()
                print(f"round {index + 1} {label}: {phase.requests_per_second} req/s, statuses {phase.statuses}")
            rounds.append(figures)
    ratios = [r["keys on"]["requests_per_second"] / r["keys off"]["requests_per_second"] for r in rounds]
    return {
        "command": " ".join(["python -m benchmarks.auth_cost", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "package": describe_package(package),
        "settings": {
            "keys_in_file": args.keys,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "client": "wrk, one thread, /classify with one CIFAR-10 JPEG a request",
        },
        "rounds": rounds,
        "ratio_median": round(median(ratios), 4),
        "ratios": [round(ratio, 4) for ratio in ratios],
        "target_ratio": TARGET_RATIO,
    }


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        "# API keys' cost",
        "",
        provenance(results),
        "",
        f"Two servers of {results['package']['name']} ({results['package']['arch']}), one worker each, side by side; "
        f"each round {settings['client']} at {settings['concurrency']} connections for {settings['seconds']} s "
        f"against each, the order alternating. The key file holds {settings['keys_in_file']} keys.",
        "",
        "| round | keys off req/s | keys on req/s | on / off | p50 off / on ms | p99 off / on ms | non-2xx |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, (figures, ratio) in enumerate(zip(results["rounds"], results["ratios"], strict=True), 1):
        off, on = figures["keys off"], figures["keys on"]
        failed = {label: {k: v for k, v in f["statuses"].items() if k != "2xx"} for label, f in figures.items()}
        lines.append(
            f"| {index} | {off['requests_per_second']} | {on['requests_per_second']} | {ratio:.3f} | "
            f"{off['p50_ms']} / {on['p50_ms']} | {off['p99_ms']} / {on['p99_ms']} | "
            f"{', '.join(f'{k}: {v}' for k, v in failed.items() if v) or 'none'} |"
        )
    verdict = "met" if results["ratio_median"] >= results["target_ratio"] else "not met"
    lines += [
        "",
        f"Median of the rounds' keys-on / keys-off ratios: **{results['ratio_median']:.3f}** (target at least "
        f"{results['target_ratio']}: {verdict}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auth_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="model package (default: the random-weight lesson CNN)")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 archive (test JPEGs)")
    parser.add_argument("--keys", type=int, default=100, help="keys in the key file (default 100)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server per round")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--out", type=Path, default=RESULTS / "auth_cost.md", help="markdown report (JSON beside)")
    return run_and_report(run, markdown, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
