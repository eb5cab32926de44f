"""Batch scoring with --engine ray: on a small local Ray instance and on a cluster started apart from the job
(--ray-address), the same rows as the local engine."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.servers import free_port
from tests.support.batch_files import BAD_FILES, LABELS, color_files, read_output, run_cli, write_archive
from tests.support.color_package import make_color_package

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_ray_engine_gives_the_local_engines_rows(tmp_path):
    package = make_color_package(tmp_path / "color")
    files = {**color_files(LABELS * 3), **{name: data for name, (data, _) in BAD_FILES.items()}}
    source = write_archive(tmp_path / "images.tar.gz", files)
    common = [
        "--model",
        package,
        "--input",
        source,
        "--top-k",
        2,
        "--batch-size",
        5,
        "--allow-failures",
    ]
    assert run_cli(*common, "--output", tmp_path / "ray.parquet", "--engine", "ray", "--workers", 1) == 0
    assert run_cli(*common, "--output", tmp_path / "local.parquet", "--workers", 0) == 0
    ray_rows, local_rows = (
        read_output(tmp_path / "ray.parquet"),
        read_output(tmp_path / "local.parquet"),
    )
    assert [r["id"] for r in ray_rows] == list(files)
    assert ray_rows == local_rows
    assert sum(r["error"] is not None for r in ray_rows) == len(BAD_FILES)
    assert all(r["label_1"] == Path(r["id"]).name.split("-")[0] for r in ray_rows if r["error"] is None)


@pytest.fixture
def ray_cluster(tmp_path):
    """A one-node Ray cluster started by `ray start --head`, as on a cluster's head node, with token
    authentication (Ray's default for `ray start`); yields (its address, the environment that holds its token)."""
    port = free_port()
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **token, "PYTHONPATH": str(repo)}  # the cluster's workers import this project
    # Its own temporary folder (short: Ray's socket paths have a length limit), so that the cluster leaves no
    # "current cluster" record in /tmp/ray for a later bare ray.init() to find.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
        "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    with open(tmp_path / "ray-head.log", "wb") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "ray-head.log").read_text()
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", {**os.environ, **token}
    finally:
        # SIGKILL to the whole group: `ray start --block` ignores SIGTERM while its processes live; the
        # workers it spawned in groups of their own exit when their raylet is gone.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_ray_engine_joins_an_existing_cluster(tmp_path, ray_cluster):
    address, env = ray_cluster
    package = make_color_package(tmp_path / "color")
    source = write_archive(tmp_path / "images.tar.gz", color_files(LABELS * 2))
    common = ["--model", package, "--input", source, "--top-k", 2, "--batch-size", 3]
    # In a process of its own, as a user runs it (Ray keeps its authentication settings per process).
    job = [sys.executable, "-m", "batch", *map(str, common), "--output", str(tmp_path / "ray.parquet")]
    done = subprocess.run([*job, "--engine", "ray", "--ray-address", address], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_cli(*common, "--output", tmp_path / "local.parquet", "--workers", 0) == 0
    assert read_output(tmp_path / "ray.parquet") == read_output(tmp_path / "local.parquet")


def test_a_cluster_that_cannot_be_joined_is_one_line_and_leaves_nothing(tmp_path, capsys):
    package = make_color_package(tmp_path / "color")
    source = write_archive(tmp_path / "images.tar.gz", color_files(LABELS))
    output = tmp_path / "out.parquet"
    nobody = f"127.0.0.1:{free_port()}"  # no cluster listens there
    code = run_cli(
        "--model", package, "--input", source, "--output", output, "--engine", "ray", "--ray-address", nobody
    )
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error
        == f"visionserve-batch: error: cannot join the Ray cluster at {nobody}: nothing answers there (Connection refused)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["color", "images.tar.gz"]  # no output, no parts folder
