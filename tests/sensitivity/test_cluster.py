"""`--address`: the perturbation scan on an existing Ray cluster (`ray start --head`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpsearch.runtime import ray_client_env

from conftest import RAY, tiny_study



def test_the_perturbation_scan_runs_its_actors_on_the_cluster(ray_cluster, tmp_path):
    # --recompute: the profile may be in this machine's disk cache already (another test measured it).
    spec = tiny_study(tmp_path, bits=(3, 8))
    out = subprocess.run(
        [sys.executable, "-m", "mpsearch", "analyze", str(spec), "--method", "perturbation", "--workers", "2", "--address", ray_cluster.address, "--json", "--recompute"],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # The pooler, which the mean-pooled loss cannot see, is named and not scanned (layers.unseen).
    assert doc["method"] == "perturbation" and len(doc["layers"]) == 36 and doc["unseen"] == ["pooler.dense"]
    scores = {row["name"]: row["score"] for row in doc["layers"]}
    assert all(s["3"] > 0 for s in scores.values())
    # The cluster's own record shows the two scorer actors it ran.
    actors = subprocess.run(
        [str(RAY), "list", "actors", "--address", ray_cluster.address, "--filter", "class_name=Scorer", "--format", "json", "--detail"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **ray_client_env()},
    )
    assert actors.returncode == 0, actors.stderr
    assert len(json.loads(actors.stdout)) >= 2


def test_an_unreachable_cluster_is_one_line_and_exit_2(tmp_path):
    spec = tiny_study(tmp_path, bits=(3, 8))
    out = subprocess.run(
        [sys.executable, "-m", "mpsearch", "analyze", str(spec), "--method", "perturbation", "--address", "127.0.0.1:1", "--recompute"],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("mpsearch: error: cannot start or reach Ray at 127.0.0.1:1")
