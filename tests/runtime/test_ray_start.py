"""Starting Ray: a new local instance keeps token auth on without printing Ray's banner about it."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = """
import os
from mpsearch.runtime.cluster import start_ray
start_ray(None, num_cpus=1)
import ray

@ray.remote
def mode():
    return os.environ.get("RAY_AUTH_MODE")

print("MODE", ray.get(mode.remote()))
ray.shutdown()
"""


def test_a_local_ray_starts_with_token_auth_and_no_banner(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MODE token" in out.stdout  # the auth Ray would have chosen, in its workers too
    assert "Token authentication" not in out.stderr, out.stderr[-2000:]
    # A mode the user chose is theirs.
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env={**env, "RAY_AUTH_MODE": "disabled"}, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "MODE disabled" in out.stdout, out.stderr[-2000:]
