"""Several models in one service: a rollout under load, two models side by side, and memory per model and over
load/unload cycles (issue 17; docs/models.md).

    python -m benchmarks.model_rollout --package packages/quick [--second-package PKG] [--seconds 60] [--load 0.8]

(a) Rollout under load: a repository holding model `a` (copies of --package); saturation of single-image /classify
is measured first (closed loop, the best of a few concurrencies), then an open loop at `--load` times it, without
swaps (the steady state) and for `--seconds` with a new version copied in and loaded through the load route every
`--swap-every` seconds, and a tampered version loaded between two of them (it must be refused). Checked: no failed
request; every answer's version was live while the request ran (loaded before its answer, not yet replaced when
it was sent); the tampered version never answers; p99 of the requests sent during a swap within 2x the steady p99.
(b) Two models side by side: `a` and `b` (--second-package, else copies of --package) in one server, each with half
the runtime threads; a closed loop sending half its requests to each. Each model's throughput is compared with its
throughput served alone (phase (a)'s saturation, or a server of `b` alone) times its share of the cores (1/2).
(c) Memory: each model's `memory_bytes` (the worker's RSS growth while it loaded) from /metadata; the worker's RSS
before and after `--cycles` unload/load cycles of `b`, which should stay within 5%.
Results: benchmarks/results/model_rollout.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import CACHE, DEFAULT_ARCHIVE, LOGS, RESULTS, machine, read_test_jpegs, run_and_report
from benchmarks.loadgen import REQUEST_TIMEOUT_S, client_session
from benchmarks.servers import SERVICE, BentoServer
from inference.package import MANIFEST_NAME
from service.auth import hash_key
from service.repository_layout import version_order

SWAP_WINDOW_S = 1.0  # a request sent up to this long after a load's answer still counts as "during the swap"
TAMPERED_VERSION = "999"  # a number, so that versions keep comparing numerically


# ---- the repository --------------------------------------------------------------------------------------------


def add_version(repository: Path, package: Path, name: str, version: str, tamper: bool = False) -> Path:
    """Copy `package` in as `name`/`version` (its manifest renamed so), the safe way: under a hidden name, then one
    rename. `tamper`: flip a byte of the model file after the copy (its checksum then fails)."""
    incoming = repository / name / f".{version}.incoming"
    shutil.copytree(package, incoming)
    manifest = json.loads((incoming / MANIFEST_NAME).read_text())
    manifest.update(name=name, version=version)
    (incoming / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    if tamper:
        model = incoming / "model.onnx"
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    return incoming.rename(repository / name / version)


def admin_keys(folder: Path) -> tuple[str, Path]:
    """A fresh admin key and the key file holding its hash."""
    key = secrets.token_urlsafe(24)
    path = folder / "admin-keys"
    path.write_text(hash_key(key) + "\n")
    return key, path


def server_of(repository: Path, keys: Path, name: str) -> BentoServer:
    env = {
        "VISIONSERVE_REPOSITORY": str(repository),
        "VISIONSERVE_ADMIN_KEYS_FILE": str(keys),
    }
    return BentoServer(SERVICE, env, log_dir=LOGS, name=name)  # started by `with`


def worker_rss(server: BentoServer) -> int:
    """The largest worker's resident memory, bytes."""
    root = psutil.Process(server.process.pid)
    workers = [p for p in root.children(recursive=True) if "python" in p.name().lower()]
    return max(p.memory_info().rss for p in workers)


# ---- clients ---------------------------------------------------------------------------------------------------


async def classify(session, url: str, image: bytes) -> tuple[str, str | None]:
    """(status, the answer's version) of one single-image /classify."""
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("image", image, filename="image.jpg", content_type="image/jpeg")
    try:
        async with session.post(url, data=form) as response:
            body = await response.read()
            version = json.loads(body).get("version") if response.status == 200 else None
            return str(response.status), version
    except asyncio.TimeoutError:
        return "timeout", None
    except aiohttp.ClientError as exc:
        return type(exc).__name__, None


async def closed_loop(url_of, images: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict:
    """`concurrency` workers back to back; worker i sends to url_of(i). OK answers per second by URL."""
    loop = asyncio.get_running_loop()
    start_at = loop.time()
    window = (start_at + warmup, start_at + warmup + seconds)
    ok: dict[str, int] = {}
    failed = 0

    async def worker(i: int) -> None:
        nonlocal failed
        url, index = url_of(i), i
        while loop.time() < window[1]:
            status, _ = await classify(session, url, images[index % len(images)])
            index += concurrency
            if window[0] <= loop.time() <= window[1]:
                if status == "200":
                    ok[url] = ok.get(url, 0) + 1
                else:
                    failed += 1

    async with client_session() as session:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"rps": {url: count / seconds for url, count in ok.items()}, "failed": failed}


async def saturation(url: str, images: list[bytes], seconds: float) -> float:
    rates = []
    for concurrency in (8, 32):
        phase = await closed_loop(lambda i: url, images, concurrency, seconds, min(3.0, seconds / 2))
        rates.append(phase["rps"].get(url, 0.0))
    return max(rates)


async def open_loop(url: str, images: list[bytes], rate: float, seconds: float, during=None) -> tuple[list, object]:
    """Requests at `rate` per second for `seconds`, whatever the answers, while `during()` (a coroutine) runs.
    Returns ([(sent s, answered s, status, version)], during's result); times from the loop's start."""
    loop = asyncio.get_running_loop()
    start_at = loop.time()
    samples: list[tuple] = []
    tasks: set[asyncio.Task] = set()

    async def one(image: bytes) -> None:
        sent = loop.time() - start_at
        status, version = await classify(session, url, image)
        samples.append((sent, loop.time() - start_at, status, version))

    async with client_session() as session:
        side = asyncio.create_task(during(start_at)) if during else None
        for k in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start_at + k / rate - loop.time()))
            task = asyncio.create_task(one(images[k % len(images)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=REQUEST_TIMEOUT_S)
        result = await side if side else None
    return samples, result


async def post_load(session, base: str, key: str, name: str, version: str) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"parameters": {"version": version}}
    async with session.post(f"{base}/v2/repository/models/{name}/load", json=body, headers=headers) as response:
        return response.status, json.loads(await response.read())


def p99_ms(latencies: list[float]) -> float | None:
    return round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None


# ---- the three phases ------------------------------------------------------------------------------------------


def rollout_phase(args, images, repository: Path, key: str, keys: Path) -> dict:
    with server_of(repository, keys, "rollout") as server:
        url = f"{server.url}/classify"
        alone = asyncio.run(saturation(url, images, args.saturation_seconds))
        rate = args.load * alone
        print(f"saturation {alone:.0f} requests/s; open loop at {rate:.0f}/s", flush=True)
        steady, _ = asyncio.run(open_loop(url, images, rate, args.steady_seconds))
        swaps: list[dict] = []

        async def swapper(start_at: float) -> None:
            loop = asyncio.get_running_loop()
            async with client_session() as session:
                version, tampered = 1, False
                next_swap = args.swap_every
                while next_swap < args.seconds:
                    if not tampered and next_swap > args.swap_every:  # between the first and the second swap
                        await asyncio.sleep(max(0.0, start_at + next_swap - args.swap_every / 2 - loop.time()))
                        add_version(repository, args.package, "a", TAMPERED_VERSION, tamper=True)
                        sent = loop.time() - start_at
                        status, body = await post_load(session, server.url, key, "a", TAMPERED_VERSION)
                        swaps.append({"version": TAMPERED_VERSION, "tampered": True, "sent": sent,
                                      "done": loop.time() - start_at, "status": status, "code": body.get("code")})  # fmt: skip
                        tampered = True
                    await asyncio.sleep(max(0.0, start_at + next_swap - loop.time()))
                    version += 1
                    add_version(repository, args.package, "a", str(version))
                    sent = loop.time() - start_at
                    status, body = await post_load(session, server.url, key, "a", str(version))
                    swaps.append({"version": str(version), "tampered": False, "sent": sent,
                                  "done": loop.time() - start_at, "status": status, "code": body.get("code")})  # fmt: skip
                    next_swap += args.swap_every

        samples, _ = asyncio.run(open_loop(url, images, rate, args.seconds, swapper))
    return {"saturation_rps": round(alone, 1), "rate_rps": round(rate, 1), **judge(steady, samples, swaps)}


def judge(steady: list, samples: list, swaps: list[dict]) -> dict:
    """Failed requests, answers from a version that was not live, and p99 during swaps against the steady state."""
    loaded = [s for s in swaps if s["status"] == 200]
    # Version v is live from its load's request (it switches in before the answer) until the next load's answer.
    live = {"1": [0.0, loaded[0]["done"] if loaded else float("inf")]}
    for i, swap in enumerate(loaded):
        live[swap["version"]] = [swap["sent"], loaded[i + 1]["done"] if i + 1 < len(loaded) else float("inf")]
    failed: dict[str, int] = {}
    not_live = 0
    for sent, answered, status, version in samples:
        if status != "200":
            failed[status] = failed.get(status, 0) + 1
        elif version not in live or not (sent <= live[version][1] and answered >= live[version][0]):
            not_live += 1
    during = [
        answered - sent
        for sent, answered, status, _ in samples
        if status == "200" and any(s["sent"] <= sent <= s["done"] + SWAP_WINDOW_S for s in loaded)
    ]
    steady_p99 = p99_ms([answered - sent for sent, answered, status, _ in steady if status == "200"])
    swap_p99 = p99_ms(during)
    return {
        "requests": len(samples),
        "failed": failed,
        "answers_not_live": not_live,
        "versions_answering": version_order({v for *_, status, v in samples if status == "200"}),
        "swaps": swaps,
        "tampered_refused": [s["code"] for s in swaps if s["tampered"]] == ["package_invalid"],
        "steady_p99_ms": steady_p99,
        "swap_p99_ms": swap_p99,
        "swap_requests": len(during),
        "swap_p99_ratio": round(swap_p99 / steady_p99, 2) if swap_p99 and steady_p99 else None,
    }


def side_by_side_phase(args, images, repository: Path, key: str, keys: Path, alone_a: float) -> dict:
    """(b) two models in one server, then (c) memory and load/unload cycles on that server."""
    alone_b = alone_a
    if args.second_package is not None:
        alone_repository = Path(tempfile.mkdtemp(dir=repository.parent))
        add_version(alone_repository, args.second_package, "b", "1")
        with server_of(alone_repository, keys, "b-alone") as server:
            alone_b = asyncio.run(saturation(f"{server.url}/classify", images, args.saturation_seconds))
    add_version(repository, args.second_package or args.package, "b", "1")
    with server_of(repository, keys, "two-models") as server:
        urls = [f"{server.url}/classify?model=a", f"{server.url}/classify?model=b"]
        phase = asyncio.run(closed_loop(lambda i: urls[i % 2], images, 32, args.mixed_seconds, 3.0))
        share = 0.5  # each model's runtime threads: the worker's split in two (service.repository_layout)
        models = {}
        for name, url, alone in (("a", urls[0], alone_a), ("b", urls[1], alone_b)):
            rps = phase["rps"].get(url, 0.0)
            models[name] = {
                "alone_rps": round(alone, 1),
                "side_by_side_rps": round(rps, 1),
                "vs_alone_times_share": round(rps / (alone * share), 2) if alone else None,
            }
        listed = {m["name"]: m for m in get_json(f"{server.url}/metadata")["models"]}
        memory = {name: listed[name]["memory_bytes"] for name in sorted(listed)}
        threads = {name: listed[name]["intra_op_threads"] for name in sorted(listed)}
        rss_start = worker_rss(server)
        cycle_failures = asyncio.run(cycles(server.url, key, args.cycles))
        rss_end = worker_rss(server)
    return {
        "models": models,
        "mixed_failed": phase["failed"],
        "intra_op_threads": threads,
        "memory_bytes": memory,
        "rss_before_cycles_mb": round(rss_start / 2**20, 1),
        "rss_after_cycles_mb": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_end / rss_start - 1, 4),
        "cycles": args.cycles,
        "cycle_failures": cycle_failures,
    }


async def cycles(base: str, key: str, count: int) -> int:
    """`count` unload/load cycles of model b; how many calls did not answer 200."""
    headers = {"Authorization": f"Bearer {key}"}
    failures = 0
    async with client_session() as session:
        for _ in range(count):
            for route in ("unload", "load"):
                async with session.post(f"{base}/v2/repository/models/b/{route}", headers=headers) as response:
                    await response.read()
                    failures += response.status != 200
    return failures


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def run(args: argparse.Namespace) -> dict:
    images = read_test_jpegs(args.archive, 256)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="model-rollout-", dir=CACHE))
    try:
        repository = work / "repository"
        repository.mkdir()
        key, keys = admin_keys(work)
        add_version(repository, args.package, "a", "1")
        started = time.monotonic()
        rollout = rollout_phase(args, images, repository, key, keys)
        for folder in (repository / "a").iterdir():  # phase (b) starts from version 1 again
            if folder.name != "1":
                shutil.rmtree(folder)
        side = side_by_side_phase(args, images, repository, key, keys, rollout["saturation_rps"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "command": "python -m benchmarks.model_rollout " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "package": str(args.package),
        "second_package": str(args.second_package or args.package),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "seconds": args.seconds,
        "swap_every_s": args.swap_every,
        "load": args.load,
        "wall_s": round(time.monotonic() - started, 1),
        "rollout": rollout,
        "side_by_side": side,
    }


def markdown(r: dict) -> str:
    m, a, b = r["machine"], r["rollout"], r["side_by_side"]
    failed = sum(a["failed"].values())
    loads = ", ".join(f"{s['version']}: {s['status']} in {s['done'] - s['sent']:.2f} s" for s in a["swaps"])
    lines = [
        "# Model rollout, two models side by side, memory",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), no GPU; load average at start {m['load_average_at_start']}  ",
        f"Packages: `{r['package']}` (model a), `{r['second_package']}` (model b); code at commit {r['commit']}",
        "",
        f"## (a) Rollout under load: {r['seconds']} s at {a['rate_rps']:.0f} requests/s ({r['load']:.0%} of the "
        f"saturation, {a['saturation_rps']:.0f}/s), a new version every {r['swap_every_s']} s",
        "",
        f"Loads (version: status, time): {loads}.",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| failed requests (not 200) | {failed} {a['failed'] or ''} of {a['requests']} | 0 |",
        f"| answers from a version that was not live | {a['answers_not_live']} (versions answering: "
        f"{', '.join(a['versions_answering'])}) | 0 |",
        f"| tampered version refused (package_invalid), never answering | {a['tampered_refused']} | True |",
        f"| p99 of requests sent during a swap vs steady state | {a['swap_p99_ms']} vs {a['steady_p99_ms']} ms "
        f"({a['swap_p99_ratio']}x, {a['swap_requests']} requests) | within 2x |",
        "",
        "## (b) Two models side by side (closed loop, 32 clients, half to each)",
        "",
        "| model | alone (requests/s) | side by side | side by side / (alone x 1/2 of the cores) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {v['alone_rps']} | {v['side_by_side_rps']} | {v['vs_alone_times_share']} |"
            for name, v in b["models"].items()
        ),
        "",
        f"Runtime threads per model: {b['intra_op_threads']}; failed requests: {b['mixed_failed']}.",
        "",
        "## (c) Memory",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| RSS growth of the worker while each model loaded (`memory_bytes`) | "
        f"{', '.join(f'{k}: {v / 2**20:.1f} MB' for k, v in b['memory_bytes'].items())} | |",
        f"| worker RSS before -> after {b['cycles']} unload/load cycles of b | {b['rss_before_cycles_mb']} -> "
        f"{b['rss_after_cycles_mb']} MB ({b['rss_growth']:+.1%}); {b['cycle_failures']} calls not 200 | within 5% |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="the model package (model a; b's by default)")
    parser.add_argument("--second-package", type=Path, help="model b's package (default: --package)")
    parser.add_argument("--seconds", type=float, default=60, help="the rollout phase's duration (default %(default)s)")
    parser.add_argument("--swap-every", type=float, default=10, help="seconds between loads (default %(default)s)")
    parser.add_argument("--load", type=float, default=0.8, help="fraction of saturation (default %(default)s)")
    parser.add_argument(
        "--saturation-seconds", type=float, default=10, help="each saturation phase (default %(default)s)"
    )
    parser.add_argument("--steady-seconds", type=float, default=20, help="the steady open loop (default %(default)s)")
    parser.add_argument("--mixed-seconds", type=float, default=20, help="the two-model phase (default %(default)s)")
    parser.add_argument("--cycles", type=int, default=100, help="unload/load cycles for memory (default %(default)s)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-style archive of test JPEGs")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_rollout.md", help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    args.argv = argv
    args.package = args.package.resolve()
    if args.second_package is not None:
        args.second_package = args.second_package.resolve()
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
