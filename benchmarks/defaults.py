"""Does the worker count the service chooses by itself serve as well as the best one set by hand?

    python -m benchmarks.defaults [--package PKG ...] [--rounds 3] [--seconds 8] [--concurrency 1 8 32 128]

For each model (the random-weight lesson CNN and CIFAR ResNet-18, plus any --package), three servers run side by
side: defaults (no VISIONSERVE_WORKERS: service/defaults.py chooses), 1 worker, and one worker per core. Each round
wrk drives each server in turn (the order rotating by round) with single CIFAR-10 JPEGs on /classify at every
concurrency; a server's figure for the round is its best concurrency's requests/s. Reported: what the defaults
chose and why (/metadata), the medians over rounds, and defaults / the best of the hand-set servers (target: at
least 0.95, the rounds' noise). Run on a quiet machine: wrk and the servers share its cores.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import httpx

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
from benchmarks.loadgen import best_concurrency, best_rate_of, rounds_table, write_image_files
from benchmarks.servers import SERVICE, BentoServer
from inference.runtime import cpu_threads

TARGET_RATIO = 0.95


def servers_for(package: Path, label: str) -> dict[str, BentoServer]:
    common = {"VISIONSERVE_MODEL": str(package), "VISIONSERVE_DEVICE": "cpu"}
    cores = cpu_threads()
    configurations = {"defaults": {}, "1 worker": {"VISIONSERVE_WORKERS": "1"}}
    if cores > 1:
        configurations[f"{cores} workers"] = {"VISIONSERVE_WORKERS": str(cores)}
    return {
        name: BentoServer(SERVICE, {**common, **extra}, LOGS, f"defaults-{label}-{name.replace(' ', '-')}")
        for name, extra in configurations.items()
    }


def measure_model(args: argparse.Namespace, label: str, package: Path, listing: Path) -> dict:
    servers = servers_for(package, label)
    names = list(servers)
    rounds: list[dict[str, dict]] = []
    for server in servers.values():
        server.start()
    try:
        chosen = httpx.get(f"{servers['defaults'].url}/metadata", timeout=10).json()["workers"]
        print(f"[{label}] defaults chose {chosen}", flush=True)
        for index in range(args.rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            figures = {}
            for name in order:
                figures[name] = best_concurrency(
                    name, f"{servers[name].url}/classify", listing, args.concurrency, args.seconds, 1
                )
                print(
                    f"[{label}] round {index + 1} {name}: best {best_rate_of(figures[name])} req/s "
                    f"at c={figures[name]['best_concurrency']}",
                    flush=True,
                )
            rounds.append(figures)
    finally:
        for server in servers.values():
            server.stop()
    best_rates = {name: median(best_rate_of(r[name]) for r in rounds) for name in names}
    hand_set = max(rate for name, rate in best_rates.items() if name != "defaults")
    return {
        "package": describe_package(package),
        "chosen": chosen,
        "rounds": rounds,
        "median_best_requests_per_second": best_rates,
        "defaults_over_best_hand_set": round(best_rates["defaults"] / hand_set, 3),
    }


def run(args: argparse.Namespace) -> dict:
    from benchmarks.random_weights import random_package

    packages = {
        "lesson-cnn": random_package(CACHE, "cnn_bn", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0],
        "resnet18": random_package(CACHE, "resnet18", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0],
        **{path.name: path for path in args.package},
    }
    listing = write_image_files(read_test_jpegs(args.data, 256), CACHE / "defaults-jpegs")
    return {
        "command": " ".join(["python -m benchmarks.defaults", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "concurrency": args.concurrency},
        "target_ratio": TARGET_RATIO,
        "models": {label: measure_model(args, label, package, listing) for label, package in packages.items()},
    }


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        "# The service's own choice of workers against the best set by hand",
        "",
        provenance(results),
        "",
        f"Per model, the servers run side by side; each round wrk (one thread, /classify with one CIFAR-10 JPEG a "
        f"request) drives each in turn at concurrencies {settings['concurrency']} for {settings['seconds']} s; a "
        f"server's figure for a round is its best concurrency's requests/s; {settings['rounds']} rounds, medians.",
        "",
    ]
    for label, model in results["models"].items():
        names = list(model["median_best_requests_per_second"])
        ratio = model["defaults_over_best_hand_set"]
        verdict = "met" if ratio >= results["target_ratio"] else "not met"
        lines += [
            f"## {label}: {model['package']['name']} ({model['package']['arch']})",
            "",
            f"Defaults chose **{model['chosen']['workers']} worker(s)**: {model['chosen']['reason']}.",
            "",
            *rounds_table(model["rounds"], names),
        ]
        medians = ", ".join(f"{name} {rate:.1f}" for name, rate in model["median_best_requests_per_second"].items())
        lines += [
            "",
            f"Medians: {medians}. Defaults / best hand-set: **{ratio:.3f}** (target at least "
            f"{results['target_ratio']}: {verdict}).",
            "",
            "p50 ms at one client (round 1): "
            + ", ".join(
                f"{name} {model['rounds'][0][name]['by_concurrency'][str(min(settings['concurrency']))]['p50_ms']}"
                for name in names
            )
            + ".",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.defaults", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, action="append", default=[], help="another model package to try")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 archive (test JPEGs)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128], help="wrk connections")
    parser.add_argument("--out", type=Path, default=RESULTS / "defaults.md", help="markdown report (JSON beside)")
    return run_and_report(run, markdown, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
