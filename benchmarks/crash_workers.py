"""Crashed workers: SIGKILL one server worker under load and account for every request that did not get a 200.

    python -m benchmarks.crash_workers --package packages/quick [--workers 1 2] [--seconds 20] [--clients 16]

For each worker count: closed-loop clients send single images to /classify; a few seconds in, one worker process
gets SIGKILL (BentoML's arbiter keeps the listening socket and starts a new worker). Each request is sorted by what
happened to it: answered 200, refused (the status and code), or failed at the connection level (reset, closed),
and by when it was sent relative to the kill. Results: benchmarks/results/crash_workers.md and .json beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from benchmarks.common import DEFAULT_ARCHIVE, LOGS, RESULTS, machine, read_test_jpegs, run_and_report
from benchmarks.loadgen import client_session
from benchmarks.servers import SERVICE, BentoServer

WORKER_MODULE = "_bentoml_impl.worker.service"  # BentoML's worker processes, children of `bentoml serve`
KILL_AFTER_S = 5.0


def worker_pids(server_pid: int) -> list[int]:
    return sorted(
        p.pid
        for p in psutil.Process(server_pid).children(recursive=True)
        if any(WORKER_MODULE in part for part in p.cmdline())
    )


async def classify(session, url: str, image: bytes) -> str:
    """'200', 'STATUS code' for a refusal, or the connection-level error's name."""
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("image", image, filename="a.jpg", content_type="image/jpeg")
    try:
        async with session.post(f"{url}/classify", data=form) as response:
            body = await response.json(content_type=None)
            return "200" if response.status == 200 else f"{response.status} {body.get('code')}"
    except asyncio.TimeoutError:
        return "timeout"
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def load_with_a_kill(url: str, server_pid: int, images: list[bytes], clients: int, seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    start = loop.time()
    outcomes: list[tuple[float, float, str]] = []  # (sent, answered) relative to the kill, outcome
    killed: dict = {}

    async def client(offset: int) -> None:
        index = offset
        while loop.time() - start < seconds:
            sent = loop.time()
            outcome = await classify(session, url, images[index % len(images)])
            outcomes.append((sent, loop.time(), outcome))
            index += clients

    async def killer() -> None:
        await asyncio.sleep(KILL_AFTER_S)
        victim = worker_pids(server_pid)[0]
        killed["pid"], killed["at"] = victim, loop.time()
        os.kill(victim, signal.SIGKILL)

    async with client_session() as session:
        await asyncio.gather(killer(), *(client(i) for i in range(clients)))
    kill = killed["at"]
    failures: dict[str, int] = {}
    for sent, _, outcome in outcomes:
        if outcome != "200":
            when = "sent before the kill" if sent < kill else "sent after the kill"
            failures[f"{outcome} ({when})"] = failures.get(f"{outcome} ({when})", 0) + 1
    after = sorted(answered - kill for sent, answered, outcome in outcomes if outcome == "200" and answered > kill)
    in_flight = sum(1 for sent, answered, _ in outcomes if sent < kill < answered)
    return {
        "requests": len(outcomes),
        "ok": sum(1 for *_, outcome in outcomes if outcome == "200"),
        "in_flight_at_kill": in_flight,
        "failures": dict(sorted(failures.items())),
        "first_200_after_kill_s": round(after[0], 3) if after else None,
        "longest_wait_of_a_200_sent_after_the_kill_s": round(
            max((answered - sent for sent, answered, o in outcomes if o == "200" and sent > kill), default=0), 3
        ),
    }


def run(args: argparse.Namespace) -> dict:
    images = read_test_jpegs(args.archive, 256)
    results = {
        "command": "python -m benchmarks.crash_workers " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "clients": args.clients,
        "seconds": args.seconds,
        "runs": {},
    }
    for workers in args.workers:
        env = {"VISIONSERVE_MODEL": str(args.package.resolve()), "VISIONSERVE_WORKERS": str(workers)}
        with BentoServer(SERVICE, env, log_dir=LOGS, name=f"crash-{workers}w") as server:
            time.sleep(1)  # every worker ready, not only the first to answer /readyz
            run_result = asyncio.run(
                load_with_a_kill(server.url, server.process.pid, images, args.clients, args.seconds)
            )
        print(f"[{workers} workers] {run_result}", flush=True)
        results["runs"][str(workers)] = run_result
    return results


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# A worker killed under load",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), no GPU; load average at start {m['load_average_at_start']}",
        "",
        f"{r['clients']} closed-loop clients on /classify for {r['seconds']} s; SIGKILL to one worker after "
        f"{KILL_AFTER_S:.0f} s.",
        "",
        "| workers | requests | 200 | in flight at the kill | not 200, by outcome and when sent | first 200 after the kill "
        "| longest 200 sent after the kill |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]
    for workers, run_result in r["runs"].items():
        failures = ", ".join(f"{k}: {v}" for k, v in run_result["failures"].items()) or "none"
        lines.append(
            f"| {workers} | {run_result['requests']} | {run_result['ok']} | {run_result['in_flight_at_kill']} | {failures} "
            f"| {run_result['first_200_after_kill_s']} s | {run_result['longest_wait_of_a_200_sent_after_the_kill_s']} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crash_workers", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="the model package to serve")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to try")
    parser.add_argument("--seconds", type=float, default=20, help="load duration per run (default %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients (default %(default)s)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-style archive of test JPEGs")
    parser.add_argument("--out", type=Path, default=RESULTS / "crash_workers.md", help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
