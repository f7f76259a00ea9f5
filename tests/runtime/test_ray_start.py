"""Starting Ray: a new local instance keeps token auth on without printing Ray's banner about it,
and a driver joins a cluster whose head runs with token auth or without."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from conftest import ray_head

CHILD = """
import os
from mpsearch.runtime.cluster import start_ray
start_ray(None, num_cpus=1)
print("PARENT", os.environ.get("RAY_AUTH_MODE"))
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
    # ... and not in this process's environment, which the processes it starts inherit: a driver
    # in token mode joining a head without auth has its actors die (InvalidAuthToken).
    assert "PARENT None" in out.stdout, out.stdout
    assert "Token authentication" not in out.stderr, out.stderr[-2000:]
    # A mode the user chose is theirs.
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env={**env, "RAY_AUTH_MODE": "disabled"}, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "MODE disabled" in out.stdout and "PARENT disabled" in out.stdout, out.stderr[-2000:]


JOIN = """
import os, sys
from mpsearch.runtime.cluster import start_ray
start_ray(sys.argv[1])
import ray

@ray.remote
class Actor:
    def ping(self):
        return "pong"

print("ACTOR", ray.get(Actor.remote().ping.remote(), timeout=120), os.environ.get("RAY_AUTH_MODE"))
"""


@pytest.mark.parametrize("head_mode", ["disabled", "token"])
def test_a_driver_with_a_token_joins_a_head_with_or_without_auth(head_mode, tmp_path):
    """A token on the driver's machine (a local Ray leaves one in ~/.ray) says nothing about the
    head's mode: sent to a head without auth it broke every actor; withheld from a head with auth,
    nothing connects."""
    token = secrets.token_hex(32)
    port = 6393 if head_mode == "disabled" else 6394
    with ray_head(port, "--include-dashboard", "false", env={"RAY_AUTH_MODE": head_mode, "RAY_AUTH_TOKEN": token}):
        env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}, "RAY_AUTH_TOKEN": token}
        out = subprocess.run([sys.executable, "-c", JOIN, f"127.0.0.1:{port}"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ACTOR pong {'token' if head_mode == 'token' else None}" in out.stdout, out.stdout + out.stderr[-2000:]
