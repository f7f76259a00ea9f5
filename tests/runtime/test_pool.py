"""The scorer pool on real Ray actors: losses in order, and a dead worker replaced, not a traceback."""

from __future__ import annotations

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


def test_cuda_workers_without_gpus_are_refused_before_ray_starts(workload):
    with pytest.raises(MPSearchError, match="needs search.gpus_per_worker > 0"):
        ScorerPool(workload.spec, workers=2, device="cuda")
