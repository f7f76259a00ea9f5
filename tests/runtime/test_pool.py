"""The scorer pool on real Ray actors: losses in order, and a dead worker replaced, not a traceback."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from mpsearch.errors import MPSearchError
from mpsearch.runtime import ScorerPool
from mpsearch.spec import Spec
from mpsearch.workload import Workload

from conftest import tiny_study


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    spec = Spec.load(tiny_study(tmp_path_factory.mktemp("pool"), bits=(3, 8)))
    return Workload(spec, device="cpu")


def test_a_worker_that_died_is_replaced_and_its_plans_scored_again(workload):
    import ray

    table = workload.layer_table()
    plans = [table.uniform(3), table.uniform(8), table.uniform(3).with_choices(**{table.names[0]: table.uniform(8)[table.names[0]]})]
    workload.candidate_bank()
    expected = ScorerPool(workload.spec, workers=0, snapshot=workload.snapshot()).map(plans)
    with ScorerPool(workload.spec, workers=2, snapshot=workload.snapshot()) as pool:
        dead = pool.actors[0]
        ray.kill(dead, no_restart=True)  # the real fault: a worker gone before its plans arrive
        losses = pool.map(plans)
        assert dead not in pool.actors  # replaced
    assert losses == pytest.approx(expected, rel=1e-5) and len(set(losses)) == 3


def _crash(actor) -> None:
    """The real fault, as the kernel's OOM killer deals it: SIGKILL to the actor's process."""
    import ray

    pid = ray.get(actor.pid.remote(), timeout=120)
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def test_a_worker_that_dies_twice_on_the_same_plans_ends_the_map_in_one_line_that_says_how_it_died(workload):
    table = workload.layer_table()
    with ScorerPool(workload.spec, workers=1, snapshot=workload.snapshot()) as pool:
        spawn = pool._spawn

        def spawn_and_crash():
            actor = spawn()
            _crash(actor)
            return actor

        pool._spawn = spawn_and_crash  # every replacement dies too
        _crash(pool.actors[0])
        with pytest.raises(MPSearchError) as error:
            pool.map([table.uniform(3)], desc="scoring")
    message = str(error.value)
    assert "\n" not in message and message.startswith("scoring: a worker died twice on the same plans (")
    # Ray's own account of the death: a crash, not a Python exception, and no address in it.
    assert "worker exit SYSTEM_ERROR" in message and not re.search(r"\d+\.\d+\.\d+\.\d+", message)


def test_cuda_workers_without_gpus_are_refused_before_ray_starts(workload):
    with pytest.raises(MPSearchError, match="needs search.gpus_per_worker > 0"):
        ScorerPool(workload.spec, workers=2, device="cuda")
