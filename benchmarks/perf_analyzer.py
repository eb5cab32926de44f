"""Triton's perf_analyzer against the service, over HTTP and gRPC, run from its wheel on a machine with an older glibc.

    python -m benchmarks.perf_analyzer prepare      # the tools, under .cache/perf_analyzer (once)
    python -m benchmarks.perf_analyzer run -- -m NAME -u 127.0.0.1:8001 -i grpc --concurrency-range 1:8:7
    python -m benchmarks.perf_analyzer validate     # a short HTTP + gRPC check against the colour package
    python -m benchmarks.perf_analyzer phase [--small-package PKG] [--resnet-package PKG]   # gRPC vs HTTP

perf_analyzer ships as the `perf-analyzer` wheel, built for manylinux_2_38: it needs glibc 2.38 and GCC 13's
libstdc++ (GLIBCXX_3.4.32), newer than Debian 12's (glibc 2.36, GCC 12), so `pip install` finds no usable version
there. `prepare` therefore:
1. downloads the wheel for that platform (`pip download --platform manylinux_2_38_x86_64`) and unpacks its binary;
2. if the binary does not start on this machine, downloads Debian 13's libc6, libstdc++6 and libgcc-s1 with
   `apt-get download` from a trixie sources list kept in a private apt folder (the system's apt configuration and
   state are untouched; apt checks the archive's signature with Debian's keyring) and extracts them with
   `dpkg-deb -x`;
3. runs perf_analyzer through that libc's own loader, `ld-linux-x86-64.so.2 --library-path NEW:SYSTEM BINARY`:
   trixie's libc and libstdc++ first, the system's folders for the rest (libssl, libz), and nothing installed.
Where the system is new enough (Debian 13, Ubuntu 24.04), step 2 is skipped and the binary runs as it is.

`validate` starts one server (gRPC on a free port) and runs a few seconds of perf_analyzer per protocol and
concurrency: it shows that the tool works unchanged over both (model metadata, Triton's model configuration and
statistics, binary tensors over HTTP, raw contents over gRPC), not how fast anything is. `phase` is the
measurement: for the lesson CNN (cnn_bn) and the CIFAR ResNet-18 (random weights unless packages are given, built
as benchmarks/load_test.py builds them), one server each, gRPC and HTTP alternating at each concurrency for
`--rounds` rounds, then wrk's /classify with a CIFAR-10 JPEG at the same concurrency (the load benchmark's client,
beside it for the same load), on a quiet machine. perf_analyzer shares the machine's cores with the server. Server-side
figures (queue, compute) need an integer model version, as Triton's: perf_analyzer reads the version as a number,
so a package versioned by its export time (20261205-153936) gets client-side figures only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
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
    read_test_jpegs,
    run_and_report,
)
from benchmarks.loadgen import write_image_files, wrk_closed_loop
from benchmarks.servers import REPO, SERVICE, BentoServer, free_port

TOOLS = REPO / ".cache" / "perf_analyzer"
PERF_ANALYZER_VERSION = "2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
DEBIAN_SUITE = "trixie"  # the first Debian with glibc >= 2.38 and GCC >= 13
DEBIAN_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SYSTEM_LIBRARIES = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")
# The columns of perf_analyzer's CSV (-f) that the reports keep, in microseconds except the rate.
CSV_FIELDS = {
    "Inferences/Second": "infer_per_s",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p99 latency": "p99_us",
    "Server Queue": "server_queue_us",
    "Server Compute Infer": "server_compute_infer_us",
}


# ---- the tools -------------------------------------------------------------------------------------------------


def prepare(version: str = PERF_ANALYZER_VERSION, tools: Path = TOOLS) -> list[str]:
    """The command prefix that runs perf_analyzer here (the binary, or the newer loader and libraries, then it);
    downloads and unpacks what is missing under `tools` first."""
    recorded = tools / "command.json"
    if recorded.is_file():
        state = json.loads(recorded.read_text())
        if state["version"] == version and all(Path(p).exists() for p in state["paths"]):
            return state["command"]
    binary = _unpack_binary(version, tools)
    if _starts([str(binary)]):
        command, paths = [str(binary)], [binary]
    else:
        root = _debian_runtime(tools)
        loader = root / "usr" / "lib64" / "ld-linux-x86-64.so.2"
        library_path = ":".join([str(root / "usr" / "lib" / "x86_64-linux-gnu"), *SYSTEM_LIBRARIES])
        command, paths = [str(loader), "--library-path", library_path, str(binary)], [loader, binary]
        if not _starts(command):
            raise RuntimeError(f"perf_analyzer does not start even with Debian {DEBIAN_SUITE}'s libc: {command}")
    recorded.write_text(json.dumps({"version": version, "command": command, "paths": [str(p) for p in paths]}))
    return command


def _starts(command: list[str]) -> bool:
    try:
        result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return result.returncode == 0 and "Perf Analyzer Version" in result.stdout + result.stderr


def _unpack_binary(version: str, tools: Path) -> Path:
    binary = tools / "bin" / f"perf_analyzer-{version}"
    if binary.is_file():
        return binary
    wheels = tools / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", f"perf-analyzer=={version}", "--no-deps",
            "--only-binary=:all:", "--platform", WHEEL_PLATFORM, "--python-version", "3.11", "-d", str(wheels),
        ],
        check=True,
    )  # fmt: skip
    [wheel] = wheels.glob(f"perf_analyzer-{version}-*.whl")
    binary.parent.mkdir(parents=True, exist_ok=True)
    with (
        zipfile.ZipFile(wheel) as archive,
        archive.open("perf_analyzer/bin/perf_analyzer") as source,
        open(binary.with_suffix(".part"), "wb") as target,
    ):
        shutil.copyfileobj(source, target)
    binary.with_suffix(".part").chmod(0o755)
    binary.with_suffix(".part").rename(binary)
    return binary


def _debian_runtime(tools: Path) -> Path:
    """Debian `DEBIAN_SUITE`'s DEBIAN_PACKAGES, downloaded through apt with a private configuration, extracted."""
    root = tools / f"debian-{DEBIAN_SUITE}"
    if (root / "usr" / "lib64" / "ld-linux-x86-64.so.2").is_file():
        return root
    apt = tools / "apt"
    for folder in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial", tools / "debs"):
        folder.mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(f"deb [signed-by={DEBIAN_KEYRING}] http://deb.debian.org/debian {DEBIAN_SUITE} main\n")
    options = [
        "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
    ]  # fmt: skip
    subprocess.run(["apt-get", *options, "update"], check=True)
    debs = tools / "debs"
    subprocess.run(["apt-get", *options, "download", *DEBIAN_PACKAGES], cwd=debs, check=True)
    staging = Path(tempfile.mkdtemp(dir=tools))
    for name in DEBIAN_PACKAGES:
        [deb] = debs.glob(f"{name}_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
    staging.rename(root)
    return root


# ---- one measurement -------------------------------------------------------------------------------------------


def measure(
    command: list[str],
    model: str,
    url: str,
    protocol: str,
    concurrency: int,
    interval_ms: int,
    max_trials: int,
    stability_pct: int,
    batch_size: int = 1,
    model_version: str | None = None,
) -> dict:
    """One perf_analyzer run at one concurrency: its CSV row's figures, or its error. `batch_size`: images per
    request (perf_analyzer's -b; its infer/s then counts images). `model_version` (-x): the version to measure; without
    it perf_analyzer takes the version whose statistics grew during the run (the service's sum every worker's, see
    service.statistics)."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.csv"
        arguments = [
            "-m", model, "-u", url, "-i", protocol, "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-interval", str(interval_ms), "--max-trials", str(max_trials),
            "--stability-percentage", str(stability_pct), "-f", str(report),
        ]  # fmt: skip
        if batch_size != 1:
            arguments += ["-b", str(batch_size)]
        if model_version is not None:
            arguments += ["-x", model_version]
        print(f"[{protocol} c={concurrency}] perf_analyzer {' '.join(arguments)}", flush=True)
        result = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=600)
        row = next(csv.DictReader(report.open()), None) if report.is_file() else None
    entry = {"protocol": protocol, "concurrency": concurrency, "returncode": result.returncode}
    if result.returncode != 0 or row is None:
        entry["error"] = (result.stdout + result.stderr).strip()[-1500:]
        print(f"  failed: {entry['error'][-300:]}", flush=True)
        return entry
    entry.update({key: float(row[column]) for column, key in CSV_FIELDS.items()})
    print(f"  {entry['infer_per_s']:.1f} infer/s, p50 {entry['p50_us'] / 1000:.2f} ms", flush=True)
    return entry


def serve(package: Path, name: str, workers: int | None) -> tuple[BentoServer, int]:
    """The service on the CPU with gRPC on a free port; `workers` None leaves VISIONSERVE_WORKERS unset (the service
    chooses)."""
    grpc_port = free_port()
    env = {
        "VISIONSERVE_MODEL": str(package),
        "VISIONSERVE_DEVICE": "cpu",
        "VISIONSERVE_GRPC_PORT": str(grpc_port),
        "VISIONSERVE_GRPC_HOST": "127.0.0.1",
    }
    if workers is not None:
        env["VISIONSERVE_WORKERS"] = str(workers)
    return BentoServer(SERVICE, env, LOGS, name), grpc_port


def measure_server(
    args: argparse.Namespace, command: list[str], package: Path, label: str, wrk_images: Path | None = None
) -> list[dict]:
    """Every protocol at every concurrency, `args.rounds` times, the protocols' order alternating by round; with
    `wrk_images` (wrk's list of JPEG files), wrk's /classify at the same concurrency after each pair."""
    model = json.loads((package / "manifest.json").read_text())["name"]
    server, grpc_port = serve(package, f"perf-{label}", args.workers)
    urls = {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{server.port}"}
    entries = []
    with server:
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                protocols = ("grpc", "http") if (round_index + concurrency) % 2 == 0 else ("http", "grpc")
                for protocol in protocols:
                    entry = measure(
                        command, model, urls[protocol], protocol, concurrency,
                        args.interval_ms, args.max_trials, args.stability,
                    )  # fmt: skip
                    entries.append({"package": label, "round": round_index + 1, **entry})
                if wrk_images is not None:
                    entries.append(
                        {"package": label, "round": round_index + 1, **wrk_entry(server, wrk_images, concurrency, args)}
                    )
    return entries


def wrk_entry(server: BentoServer, listing: Path, concurrency: int, args: argparse.Namespace) -> dict:
    """wrk's closed loop on /classify (one CIFAR-10 JPEG a request) for as long as perf_analyzer's shortest run."""
    seconds = 3 * args.interval_ms / 1000
    phase = wrk_closed_loop(server.name, f"{server.url}/classify", listing, concurrency, seconds, warmup=1)
    print(f"[wrk c={concurrency}] {phase.requests_per_second:.1f} req/s, p50 {phase.p50_ms} ms", flush=True)
    return {
        "protocol": "wrk /classify (JPEG)",
        "concurrency": concurrency,
        "returncode": 0,
        "infer_per_s": phase.requests_per_second,
        "p50_us": phase.p50_ms * 1000,
        "p99_us": phase.p99_ms * 1000,
        "statuses": phase.statuses,
    }


# ---- reports ---------------------------------------------------------------------------------------------------


def header(args: argparse.Namespace, command: list[str]) -> dict:
    return {
        "command": " ".join(["python -m benchmarks.perf_analyzer", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "perf_analyzer": {"version": PERF_ANALYZER_VERSION, "command": command},
        "settings": {
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "measurement_interval_ms": args.interval_ms,
            "max_trials": args.max_trials,
            "stability_percentage": args.stability,
            "workers": args.workers,
        },
    }


def run_validate(args: argparse.Namespace) -> dict:
    command = prepare()
    package = args.package
    if package is None:
        from tests.support.color_package import make_color_package  # a tiny model: the tool is checked, not it

        package = make_color_package(CACHE / "perf-analyzer-color" / "color")
    results = header(args, command)
    results["purpose"] = (
        "A check that perf_analyzer works unchanged over both protocols, a few seconds a measurement with a tiny "
        "model on a shared machine: the figures are indicative only (the measurement is `phase`)."
    )
    label = describe_package(package)["name"]
    results["packages"] = {label: describe_package(package)}
    results["runs"] = measure_server(args, command, package, label)
    return results


def run_phase(args: argparse.Namespace) -> dict:
    from benchmarks.random_weights import random_package

    command = prepare()
    packages = {
        "lesson-cnn": args.small_package
        or random_package(CACHE, "cnn_bn", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0],
        "resnet18": args.resnet_package
        or random_package(CACHE, "resnet18", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0],
    }
    results = header(args, command)
    results["purpose"] = "gRPC vs HTTP through Triton's own load generator, side by side on one server per model."
    results["packages"] = {label: describe_package(package) for label, package in packages.items()}
    listing = write_image_files(read_test_jpegs(args.data, 256), CACHE / "perf-analyzer-jpegs")
    results["runs"] = [
        entry for label, package in packages.items() for entry in measure_server(args, command, package, label, listing)
    ]
    return results


def markdown(results: dict) -> str:
    settings = results["settings"]
    started = " ".join(results["perf_analyzer"]["command"]).replace(f"{REPO}/", "")
    lines = [
        "# perf_analyzer over gRPC and HTTP",
        "",
        f"`{results['command']}` on {results['date']}.",
        "",
        results["purpose"],
        "",
        f"Machine: {results['machine']['nproc']} cores, {results['machine']['cpu_model']}, load average at start "
        f"{results['machine']['load_average_at_start']} (shared with other work; perf_analyzer runs on the same "
        "cores as the server). "
        f"perf_analyzer {results['perf_analyzer']['version']}, started as `{started}`.",
        "",
        f"Per measurement: windows of {settings['measurement_interval_ms']} ms until three in a row agree within "
        f"{settings['stability_percentage']}% (at most {settings['max_trials']} windows); {settings['rounds']} "
        f"round(s), {settings['workers']} worker(s), batch size 1 (one image a request), random UINT8 `pixels`.",
        "",
        "| package | round | protocol | concurrency | infer/s | p50 ms | p90 ms | p99 ms | server queue us | "
        "server compute us |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        if "error" in run:
            lines.append(
                f"| {run['package']} | {run['round']} | {run['protocol']} | {run['concurrency']} | failed: "
                f"{run['error'][-120:].replace('|', '/').replace(chr(10), ' ')} | | | | | |"
            )
            continue
        lines.append(
            f"| {run['package']} | {run['round']} | {run['protocol']} | {run['concurrency']} | "
            f"{run['infer_per_s']:.1f} | {run['p50_us'] / 1000:.2f} | {_ms(run.get('p90_us'))} | "
            f"{run['p99_us'] / 1000:.2f} | {_whole(run.get('server_queue_us'))} | "
            f"{_whole(run.get('server_compute_infer_us'))} |"
        )
    lines += [
        "",
        "Medians of the rounds (perf_analyzer's gRPC and HTTP send UINT8 pixels as raw or binary tensors to "
        "`/v2/models/NAME/infer`; wrk sends a CIFAR-10 JPEG to `/classify`, which the server decodes):",
        "",
        "| package | protocol | concurrency | infer/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for (package, protocol, concurrency), runs in sorted(by_measurement(results["runs"]).items()):
        rate, p50, p99 = (median([run[key] for run in runs]) for key in ("infer_per_s", "p50_us", "p99_us"))
        lines.append(f"| {package} | {protocol} | {concurrency} | {rate:.1f} | {p50 / 1000:.2f} | {p99 / 1000:.2f} |")
    ratios = grpc_over_http(results["runs"])
    if ratios:
        lines += ["", "gRPC / HTTP inferences per second (median of the rounds):", ""]
        lines += [f"- {package}, c = {c}: {ratio:.2f}" for (package, c), ratio in sorted(ratios.items())]
    packages = ", ".join(
        f"{label}: {p['name']} {p['version']} ({p['arch']})" for label, p in results["packages"].items()
    )
    lines += ["", f"Packages: {packages}.", ""]
    return "\n".join(lines)


def by_measurement(runs: list[dict]) -> dict[tuple[str, str, int], list[dict]]:
    grouped: dict[tuple[str, str, int], list[dict]] = {}
    for run in runs:
        if "error" not in run:
            grouped.setdefault((run["package"], run["protocol"], run["concurrency"]), []).append(run)
    return grouped


def _ms(microseconds: float | None) -> str:
    return "" if microseconds is None else f"{microseconds / 1000:.2f}"


def _whole(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def grpc_over_http(runs: list[dict]) -> dict[tuple[str, int], float]:
    """Median over rounds of each round's gRPC / HTTP rate, by (package, concurrency)."""
    by_key: dict[tuple[str, int, int], dict[str, float]] = {}
    for run in runs:
        if "error" not in run:
            by_key.setdefault((run["package"], run["concurrency"], run["round"]), {})[run["protocol"]] = run[
                "infer_per_s"
            ]
    ratios: dict[tuple[str, int], list[float]] = {}
    for (package, concurrency, _), rates in by_key.items():
        if rates.get("http") and "grpc" in rates:
            ratios.setdefault((package, concurrency), []).append(rates["grpc"] / rates["http"])
    return {key: sorted(values)[len(values) // 2] for key, values in ratios.items()}


# ---- the command line ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # everything after `run` (and an optional --) goes to perf_analyzer unchanged
        passed = argv[2:] if argv[1:2] == ["--"] else argv[1:]
        command = prepare()
        os.execv(command[0], [*command, *passed])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_analyzer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="download and unpack perf_analyzer (and, if needed, a newer libc) once")
    commands.add_parser("run", help="run perf_analyzer with the arguments after `run --`")
    validate = commands.add_parser("validate", help="a few seconds per protocol against one server: does it work?")
    validate.add_argument("--package", type=Path, help="model package to serve (default: the colour test package)")
    validate.add_argument(
        "--out", type=Path, default=RESULTS / "perf_analyzer_validation.md", help="markdown report (JSON beside it)"
    )
    phase = commands.add_parser("phase", help="gRPC vs HTTP for the lesson CNN and the ResNet-18 (quiet machine)")
    phase.add_argument("--small-package", type=Path, help="package of the lesson CNN (default: random-weight cnn_bn)")
    phase.add_argument("--resnet-package", type=Path, help="package of the CIFAR ResNet-18 (default: random weights)")
    phase.add_argument(
        "--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 archive for building random-weight packages"
    )
    phase.add_argument(
        "--out", type=Path, default=RESULTS / "perf_analyzer.md", help="markdown report (JSON beside it)"
    )
    for sub, defaults in ((validate, ("1,8", 1, 1500, 4, 50)), (phase, ("1,8,32", 3, 5000, 10, 10))):
        concurrency, rounds, interval_ms, max_trials, stability = defaults
        sub.add_argument(
            "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=concurrency,
            help=f"comma-separated concurrencies (default {concurrency})",
        )  # fmt: skip
        sub.add_argument("--rounds", type=int, default=rounds, help=f"rounds of every measurement (default {rounds})")
        sub.add_argument(
            "--interval-ms", type=int, default=interval_ms, help=f"perf_analyzer's -p window (default {interval_ms})"
        )
        sub.add_argument(
            "--max-trials", type=int, default=max_trials, help=f"perf_analyzer's -r (default {max_trials})"
        )
        sub.add_argument(
            "--stability", type=int, default=stability, help=f"perf_analyzer's -s percentage (default {stability})"
        )
        sub.add_argument("--workers", type=int, default=1, help="VISIONSERVE_WORKERS of the server (default 1)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(" ".join(prepare()))
        return 0
    if isinstance(args.concurrency, str):
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return run_and_report(run_validate if args.command == "validate" else run_phase, markdown, args)


if __name__ == "__main__":
    sys.exit(main())
