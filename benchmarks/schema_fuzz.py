"""Generated hostile requests: Schemathesis against the service's own OpenAPI schema (BentoML's /docs.json), every
route and content type, then every answer counted: 5xx, connection drops, and error bodies that are not JSON.

    python -m benchmarks.schema_fuzz [--max-examples 200] [--package PACKAGE]

Starts `bentoml serve` on a free loopback port (the colour test package by default, so that any route's
success is cheap), runs `schemathesis run` with its examples, coverage, fuzzing and stateful phases, reads its
NDJSON report and writes benchmarks/results/schema_fuzz.md and .json beside it.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import LOGS, RESULTS, machine, run_and_report
from benchmarks.servers import SERVICE, BentoServer

CHECKS = "not_a_server_error,content_type_conformance,status_code_conformance"


def interactions(report: Path) -> list[dict]:
    """Every request Schemathesis sent, with its response (None when the connection failed)."""
    found = []
    for line in report.read_text().splitlines():
        event = json.loads(line)
        scenario = event.get("ScenarioFinished")
        if scenario:
            found.extend(scenario["recorder"].get("interactions", {}).values())
    return found


def is_json(response: dict) -> bool:
    content = response.get("content") or {}
    body = base64.b64decode(content["$base64"]) if "$base64" in content else (content.get("text") or "").encode()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def run(args: argparse.Namespace) -> dict:
    package = args.package
    with tempfile.TemporaryDirectory() as folder:
        if package is None:
            from tests.support.color_package import make_color_package

            package = make_color_package(Path(folder) / "color")
        report = Path(folder) / "report.ndjson"
        env = {"VISIONSERVE_MODEL": str(Path(package).resolve())}
        with BentoServer(SERVICE, env, log_dir=LOGS, name="schema-fuzz") as server:
            command = [
                str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/docs.json",
                "--checks", CHECKS, "--max-examples", str(args.max_examples), "--seed", str(args.seed),
                "--workers", "1", "--report", "ndjson", "--report-ndjson-path", str(report),
            ]  # fmt: skip
            st = subprocess.run(command, capture_output=True, text=True, cwd=folder)
            alive = server.process.poll() is None
            log = server.log_tail(200_000)
        sent = interactions(report)
    statuses = collections.Counter(
        str(i["response"]["status_code"]) if i.get("response") else "no response" for i in sent
    )
    not_json = [
        i for i in sent if i.get("response") and i["response"]["status_code"] >= 400 and not is_json(i["response"])
    ]
    examples = sorted({f"{i['request']['method']} {i['request']['uri'].split('?')[0].split('/', 3)[-1]} -> "
                       f"{i['response']['status_code']}" for i in not_json})[:10]  # fmt: skip
    by_route = collections.Counter(
        f"{i['request']['method']} {i['request']['uri'].split('?')[0].split('/', 3)[-1]}" for i in sent
    )
    summary = [line for line in st.stdout.splitlines() if "generated" in line or "passed" in line or "failed" in line]
    return {
        "command": "python -m benchmarks.schema_fuzz " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "schemathesis": st.stdout.splitlines()[0] if st.stdout else "",
        "schemathesis_exit_code": st.returncode,
        "schemathesis_summary": summary[-3:],
        "requests": len(sent),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(n for status, n in statuses.items() if status.startswith("5")),
        "no_response": statuses.get("no response", 0),
        "errors_not_json": len(not_json),
        "errors_not_json_examples": examples,
        "routes": len(by_route),
        "server_alive_after": alive,
        "tracebacks_in_server_log": log.count("Traceback"),
        "failures_output": st.stdout[-3000:] if st.returncode != 0 else "",
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Generated requests against the OpenAPI schema (Schemathesis)",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), no GPU; load average at start {m['load_average_at_start']}",
        "",
        f"Checks: {CHECKS}; Schemathesis exit code {r['schemathesis_exit_code']} "
        f"({'; '.join(s.strip() for s in r['schemathesis_summary'])}).",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| requests sent, to {r['routes']} distinct paths | {r['requests']} | thousands |",
        f"| answers 5xx | {r['server_errors']} | 0 |",
        f"| requests without an answer (connection dropped) | {r['no_response']} | 0 |",
        f"| error answers whose body is not JSON | {r['errors_not_json']} | 0 |",
        f"| server still up afterwards; tracebacks in its log | {r['server_alive_after']}; {r['tracebacks_in_server_log']} | yes; 0 |",
        "",
        f"Statuses: {r['statuses']}",
    ]
    if r["errors_not_json_examples"]:
        lines += ["", f"Error answers that are not JSON: {r['errors_not_json_examples']}"]
    if r["failures_output"]:
        lines += ["", "Schemathesis reported:", "", "```", r["failures_output"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.schema_fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="model package to serve (default: the colour test package)")
    parser.add_argument("--max-examples", type=int, default=200, help="examples per operation and phase")
    parser.add_argument("--seed", type=int, default=0, help="Schemathesis's seed (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "schema_fuzz.md", help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
