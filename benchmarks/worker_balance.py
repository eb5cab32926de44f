"""How evenly two workers share a keep-alive client pool's requests, with connection rebalancing on and off.

    python -m benchmarks.worker_balance [--package PKG] [--rounds 3] [--seconds 10] [--loads 0.5 0.7]

Two servers of the same package with two workers each (the lesson CNN by default: the service chooses two workers
for it on two cores), one with VISIONSERVE_REBALANCE_EVERY=0 and one with the default (50), side by side. First
the rebalancing server's saturation: wrk's best requests/s at 64 and 128 connections. Then each round drives each
server in turn (the order alternating) with the open-loop client (benchmarks/loadgen.open_loop: 64 keep-alive
connections opened together at the start, as a client's pool or a proxy's does, requests at a fixed rate) at each
load, a fraction of that saturation. Each worker's share of the requests comes from the statistics files that the
workers share (service/statistics.py): the figure is the busier worker's share (0.5 = even), beside p50 / p99.
Run on a quiet machine: the client and both servers share its cores.
"""

from __future__ import annotations

import argparse
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
from benchmarks.loadgen import OPEN_LOOP_CONNECTIONS, open_loop, write_image_files, wrk_closed_loop
from benchmarks.servers import SERVICE, BentoServer
from service.statistics import requests_by_worker, server_folder

SATURATION_CONCURRENCY = (64, 128)
# Each server's settings beyond the package's: the same two workers, rebalancing off or at its default.
VARIANTS = {
    "rebalancing off": {"VISIONSERVE_WORKERS": "2", "VISIONSERVE_REBALANCE_EVERY": "0"},
    "rebalancing on": {"VISIONSERVE_WORKERS": "2"},
}


def requests_per_worker(home: Path) -> dict[int, int]:
    """Requests answered so far by each worker of the server whose BENTOML_HOME is `home`."""
    return requests_by_worker(server_folder(home))


def run(args: argparse.Namespace) -> dict:
    import uvloop

    from benchmarks.random_weights import random_package

    package = args.package or random_package(CACHE, "cnn_bn", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0]
    jpegs = read_test_jpegs(args.data, 256)
    listing = write_image_files(jpegs, CACHE / "worker-balance" / "jpegs")
    common = {"VISIONSERVE_MODEL": str(package), "VISIONSERVE_DEVICE": "cpu"}
    homes = {label: CACHE / "worker-balance" / label for label in VARIANTS}
    servers = {
        label: BentoServer(
            SERVICE, {**common, **variant, "BENTOML_HOME": str(homes[label])}, LOGS, f"balance-{label.split()[-1]}"
        )
        for label, variant in VARIANTS.items()
    }
    rounds = []
    with servers["rebalancing off"], servers["rebalancing on"]:
        url = f"{servers['rebalancing on'].url}/classify"
        saturation = max(
            wrk_closed_loop("saturation", url, listing, c, args.seconds / 2, 2).requests_per_second
            for c in SATURATION_CONCURRENCY
        )
        print(f"saturation (rebalancing on, wrk): {saturation} req/s", flush=True)
        for index in range(args.rounds):
            order = list(servers) if index % 2 == 0 else list(servers)[::-1]
            figures: dict[str, dict] = {}
            for label in order:
                for load in args.loads:
                    before = requests_per_worker(homes[label])
                    phase = uvloop.run(
                        open_loop(label, f"{servers[label].url}/classify", jpegs, load * saturation, args.seconds, 2)
                    )
                    after = requests_per_worker(homes[label])
                    counts = [after[pid] - before.get(pid, 0) for pid in after]
                    figures.setdefault(label, {})[str(load)] = {
                        **phase.figures(),
                        "requests_per_worker": counts,
                        "busier_worker_share": round(max(counts) / max(1, sum(counts)), 3),
                    }
                    print(
                        f"round {index + 1} {label} at {load:.0%}: workers {counts}, p50 {phase.p50_ms} "
                        f"p99 {phase.p99_ms} ms, {phase.statuses}",
                        flush=True,
                    )
            rounds.append(figures)
    summary = {
        str(load): {
            label: {
                key: median(r[label][str(load)][key] for r in rounds)
                for key in ("busier_worker_share", "p50_ms", "p99_ms")
            }
            for label in servers
        }
        for load in args.loads
    }
    return {
        "command": " ".join(["python -m benchmarks.worker_balance", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "package": describe_package(package),
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "loads": args.loads,
            "connections": OPEN_LOOP_CONNECTIONS,
        },
        "saturation_requests_per_second": saturation,
        "rounds": rounds,
        "medians": summary,
    }


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        "# Two workers and one keep-alive client pool: connection rebalancing on and off",
        "",
        provenance(results),
        "",
        f"Two servers of {results['package']['name']} ({results['package']['arch']}), two workers each, side by side: "
        "`VISIONSERVE_REBALANCE_EVERY=0` (off) and the default, 50 (on). Saturation (rebalancing on, wrk at "
        f"{', '.join(map(str, SATURATION_CONCURRENCY))} connections): {results['saturation_requests_per_second']} "
        f"req/s. Each round, each server in turn, the open-loop client with {settings['connections']} keep-alive "
        f"connections opened together, {settings['seconds']} s at each load. The busier worker's share of the "
        "requests: 0.5 is even, 1.0 one worker serving everything.",
        "",
        "| round | load | off: busier share | off: p50 / p99 ms | on: busier share | on: p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for index, figures in enumerate(results["rounds"], 1):
        for load in settings["loads"]:
            off, on = figures["rebalancing off"][str(load)], figures["rebalancing on"][str(load)]
            lines.append(
                f"| {index} | {load:.0%} ({on['target_rate']:.0f}/s) | {off['busier_worker_share']} "
                f"{off['requests_per_worker']} | {off['p50_ms']} / {off['p99_ms']} | {on['busier_worker_share']} "
                f"{on['requests_per_worker']} | {on['p50_ms']} / {on['p99_ms']} |"
            )
    lines += ["", "Medians of the rounds:", ""]
    for load, by_label in results["medians"].items():
        off, on = by_label["rebalancing off"], by_label["rebalancing on"]
        lines.append(
            f"- at {float(load):.0%}: busier worker's share {off['busier_worker_share']} off, "
            f"**{on['busier_worker_share']}** on; p99 {off['p99_ms']} ms off, **{on['p99_ms']}** ms on."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker_balance", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="model package (default: the random-weight lesson CNN)")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 archive (test JPEGs)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per load (default 10)")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.7], help="fractions of the saturation")
    parser.add_argument("--out", type=Path, default=RESULTS / "worker_balance.md", help="markdown (JSON beside)")
    return run_and_report(run, markdown, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
