"""A replica added behind a TCP balancer: how much of the already connected clients' load it gets, with the
service's connection max age (VISIONSERVE_CONNECTION_MAX_AGE_S) and without it.

    python -m benchmarks.replica_spread --package .cache/bench/packages/cnn_bn [--max-age 60] [--seconds 90]

HAProxy (Debian's `haproxy`) balances connections round-robin over two replicas in TCP mode and checks each with
GET /readyz, as a Kubernetes Service with readiness probes does. wrk's keep-alive connections open while only
replica A is up, so all of them land on A; then replica B starts. Each replica runs one worker. Reported per window
after B is ready: the requests each replica answered (from its /metrics), B's share, and wrk's failed requests.

Results: benchmarks/results/replica_spread.md and .json beside it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from benchmarks.common import DEFAULT_ARCHIVE, LOGS, RESULTS, machine, provenance, read_test_jpegs, run_and_report
from benchmarks.loadgen import write_image_files, wrk_closed_loop
from benchmarks.servers import SERVICE, BentoServer, free_port, wait_until_answering

WINDOW_S = 5.0
CONNECTIONS = 16
ANSWERED = "visionserve_queue_wait_seconds_count"  # one per image that reached the model: one per /classify


def answered(server: BentoServer) -> int:
    """The requests `server` has answered so far, from its /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(ANSWERED)))


def forwards(port: int) -> bool:
    """Whether the balancer on `port` forwards a request to a ready replica."""
    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200


def haproxy_config(port: int, replicas: dict[str, int]) -> str:
    servers = "\n".join(
        f"  server {name} 127.0.0.1:{replica_port} check inter 500 fall 1 rise 1"
        for name, replica_port in replicas.items()
    )
    return f"""global
  maxconn 4096
defaults
  mode tcp
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend front
  bind 127.0.0.1:{port}
  default_backend replicas
backend replicas
  balance roundrobin
  option httpchk GET /readyz
{servers}
"""


def spread(args: argparse.Namespace, listing: Path, max_age_s: float) -> dict:
    env = {
        "VISIONSERVE_MODEL": str(args.package.resolve()),
        "VISIONSERVE_WORKERS": "1",
        "VISIONSERVE_CONNECTION_MAX_AGE_S": f"{max_age_s:g}",
    }
    front = free_port()
    with tempfile.TemporaryDirectory() as folder:
        # A BentoML home each: replicas sharing one would share (and, starting, empty) one metrics folder.
        a = BentoServer(SERVICE, {**env, "BENTOML_HOME": f"{folder}/a"}, log_dir=LOGS, name="replica-a")
        b = BentoServer(SERVICE, {**env, "BENTOML_HOME": f"{folder}/b"}, log_dir=LOGS, name="replica-b")
        config = Path(folder) / "haproxy.cfg"
        config.write_text(haproxy_config(front, {"a": a.port, "b": b.port}))
        balancer_log = LOGS / "replica-spread-haproxy.log"
        with open(balancer_log, "wb") as log:
            balancer = subprocess.Popen(["haproxy", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            with a:
                # Until HAProxy's check (every 500 ms) sees A ready: a connection it cannot forward fails, and wrk
                # would count and retry that at once, many times.
                wait_until_answering(balancer, lambda: forwards(front), 30, "haproxy", balancer_log)
                load: dict = {}
                duration = args.seconds + 20  # B's start (about 5 s) and the windows after it
                url = f"http://127.0.0.1:{front}/classify"
                wrk = threading.Thread(
                    target=lambda: load.update(
                        phase=wrk_closed_loop("balancer", url, listing, CONNECTIONS, duration, warmup=0)
                    )
                )
                wrk.start()
                time.sleep(3)  # every wrk connection is open, on A
                with b:
                    time.sleep(1)  # HAProxy's next check sees B ready
                    windows = []
                    counts = (answered(a), answered(b))
                    end = time.monotonic() + args.seconds
                    while time.monotonic() < end:
                        time.sleep(WINDOW_S)
                        now = (answered(a), answered(b))
                        windows.append({"a": now[0] - counts[0], "b": now[1] - counts[1]})
                        counts = now
                    wrk.join()
        finally:
            balancer.terminate()
            balancer.wait(10)
    phase = load["phase"]
    return {
        "max_age_s": max_age_s,
        "windows": windows,
        "b_share": share_of_b(windows),
        "b_share_last_half": share_of_b(windows[len(windows) // 2 :]),
        "requests_per_second": phase.requests_per_second,
        "statuses": phase.statuses,
    }


def share_of_b(windows: list[dict]) -> float:
    a, b = sum(w["a"] for w in windows), sum(w["b"] for w in windows)
    return round(b / max(1, a + b), 3)


def run(args: argparse.Namespace) -> dict:
    listing = write_image_files(read_test_jpegs(args.archive, 64), LOGS / "replica-spread-images")
    return {
        "command": "python -m benchmarks.replica_spread " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
        "connections": CONNECTIONS,
        "seconds": args.seconds,
        "runs": [spread(args, listing, args.max_age), spread(args, listing, 0)],
    }


def markdown(r: dict) -> str:
    lines = [
        "# A replica added behind a TCP balancer",
        "",
        provenance(r),
        "",
        f"{r['haproxy']}, TCP mode, round-robin over replicas A and B (one worker each), checked with GET /readyz. "
        f"wrk's {r['connections']} keep-alive connections open while only A is up; then B starts. Requests each "
        f"replica answered (its /metrics) in each {WINDOW_S:g}-s window of the {r['seconds']:g} s after B is ready:",
        "",
        "| VISIONSERVE_CONNECTION_MAX_AGE_S | B's share, all windows | B's share, last half | A / B per window "
        "| wrk: requests/s, answers |",
        "|---|---:|---:|---|---|",
    ]
    for run in r["runs"]:
        per_window = ", ".join(f"{w['a']}/{w['b']}" for w in run["windows"])
        lines.append(
            f"| {run['max_age_s']:g}{' (off)' if not run['max_age_s'] else ''} | {run['b_share']:.1%} "
            f"| {run['b_share_last_half']:.1%} | {per_window} | {run['requests_per_second']}, {run['statuses']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replica_spread", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="the model package both replicas serve")
    parser.add_argument(
        "--max-age", type=float, default=60, help="the first run's connection max age, s (default %(default)s)"
    )
    parser.add_argument("--seconds", type=float, default=90, help="measured after B is ready (default %(default)s)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-style archive of test JPEGs")
    parser.add_argument("--out", type=Path, default=RESULTS / "replica_spread.md", help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
