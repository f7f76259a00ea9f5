"""`--address`: the perturbation scan on an existing Ray cluster (`ray start --head`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpsearch.search.pool import ray_client_env

from conftest import tiny_study

RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """The cluster .ci/run started (``$MPSEARCH_TEST_RAY_ADDRESS``), or one started here.

    One started here runs in the foreground (``--block``) in its own session and is stopped
    by signalling that session: ``ray stop`` would kill every Ray process on the machine,
    this test process's own local Ray included.
    """
    import signal
    import socket
    import time

    address = os.environ.get("MPSEARCH_TEST_RAY_ADDRESS")
    if address:
        yield address
        return
    port = 6391
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(0.5)
        time.sleep(3)  # the dashboard (state API) comes up after the GCS port
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)


def test_the_perturbation_scan_runs_its_actors_on_the_cluster(ray_cluster, tmp_path):
    spec = tiny_study(tmp_path, bits=(3, 8))
    out = subprocess.run(
        [sys.executable, "-m", "mpsearch", "analyze", str(spec), "--method", "perturbation", "--workers", "2", "--address", ray_cluster, "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["method"] == "perturbation" and len(doc["layers"]) == 37
    scores = {row["name"]: row["score"] for row in doc["layers"]}
    assert scores["pooler.dense"] == {"3": 0.0, "8": 0.0}
    assert all(s["3"] > 0 for name, s in scores.items() if name != "pooler.dense")
    # The cluster's own record shows the two scorer actors it ran.
    actors = subprocess.run(
        [str(RAY), "list", "actors", "--address", ray_cluster, "--filter", "class_name=Scorer", "--format", "json", "--detail"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **ray_client_env()},
    )
    assert actors.returncode == 0, actors.stderr
    assert len(json.loads(actors.stdout)) >= 2


def test_an_unreachable_cluster_is_one_line_and_exit_2(tmp_path):
    spec = tiny_study(tmp_path, bits=(3, 8))
    out = subprocess.run(
        [sys.executable, "-m", "mpsearch", "analyze", str(spec), "--method", "perturbation", "--address", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("mpsearch: error: cannot start or reach Ray at 127.0.0.1:1")
