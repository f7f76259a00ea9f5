"""GPU workers on Ray, tested on a CPU machine: a real Ray head that declares two GPUs.

Ray hands out GPU ids from what the head declares (``ray start --head --num-gpus 2``) and sets
each actor's ``CUDA_VISIBLE_DEVICES`` to them; nothing here touches CUDA (the scorers are asked
where they run, and load nothing).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import tiny_study, wait_for_port

RAY = Path(sys.executable).with_name("ray")

PLACEMENTS = """
import json, sys
from mpsearch.runtime import ScorerPool
from mpsearch.spec import Spec
spec = Spec.load(sys.argv[1])
with ScorerPool(spec, workers=int(sys.argv[3]), address=sys.argv[2], device="cuda", gpus_per_worker=float(sys.argv[4])) as pool:
    print(json.dumps(pool.placements()))
"""


@pytest.fixture(scope="module")
def gpu_head(tmp_path_factory):
    """A single-node Ray cluster that declares 2 GPUs and 4 CPUs, in its own session, stopped after."""
    port, dashboard = 6393, 8277
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "4", "--num-gpus", "2",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", "52393",
         "--disable-usage-stats", "--temp-dir", str(tmp_path_factory.mktemp("ray"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    try:
        wait_for_port(port, lambda: head.poll() is None)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)


@pytest.mark.parametrize("workers, fraction", [(2, 1.0), (4, 0.5)])
def test_each_scorer_gets_its_own_share_of_the_declared_gpus(gpu_head, tmp_path, workers, fraction):
    spec = tiny_study(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PLACEMENTS, str(spec), gpu_head, str(workers), str(fraction)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    placements = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(placements) == workers and len({p["pid"] for p in placements}) == workers
    assert all(p["device"] == "cuda" for p in placements)  # inside, each runs on "its" cuda
    ids = [p["gpu_ids"] for p in placements]
    assert all(len(i) == 1 for i in ids)
    assert all(p["cuda_visible_devices"] == p["gpu_ids"][0] for p in placements)  # Ray hides the other GPU
    # 1 GPU each: the two GPUs, one actor on each; half a GPU each: two actors share each GPU.
    assert Counter(i[0] for i in ids) == Counter({"0": workers // 2, "1": workers // 2})
