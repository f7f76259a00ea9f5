"""What the search driver costs per trial (ask + repair + tell) on PostgreSQL, at 100 and 5,000 stored trials.

The trial's evaluation is left out: this is the driver's own cost, the part that must not
grow into the bottleneck as a study gets long. The study has MiniLM's 37 layers and 5
widths; the stored trials are added in bulk (complete, with plans that fit), then the
driver's own path is timed: the repairing sampler's ask (TPE, multivariate, constant liar),
the plan's attributes, and the tell.

    .venv/bin/python benchmarks/driver_cost.py [--storage postgresql+psycopg://postgres@127.0.0.1:5432/test] [--sampler tpe]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path

import numpy as np

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"])
    parser.add_argument("--sizes", default="100,5000")
    parser.add_argument("--timed", type=int, default=30)
    args = parser.parse_args()

    import optuna
    from optuna.trial import TrialState

    from mpsearch.search.allocate import Costs, repair
    from mpsearch.search.driver import ATTR_SOURCE, SAMPLED, ask_plan, tell_plan, write_trial
    from mpsearch.search.sampler import RepairingSampler, make_sampler, search_space
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage
    from mpsearch.storage.store import ATTR_BPW, ATTR_BYTES, ATTR_PLAN
    from mpsearch.workload import Workload

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = Spec.load(STUDY)
    table = Workload(spec).layer_table()
    rng = np.random.default_rng(0)
    scores = {n: {b: float(rng.lognormal()) * 4.0 ** -(b - 2) for b in table.menu} for n in table.names}
    costs = Costs.of(table, scores)
    budget = table.budget_bytes(spec.budget.to_budget())
    space = search_space(costs)
    storage = Storage(args.storage)

    print(f"driver cost per trial on {args.storage.split('@')[-1]}, sampler {args.sampler}, {len(table.names)} layers")
    for size in [int(x) for x in args.sizes.split(",")]:
        name = f"bench-driver-{size}-{uuid.uuid4().hex[:8]}"
        sampler = RepairingSampler(make_sampler(args.sampler, seed=0), costs, budget)
        study = optuna.create_study(study_name=name, storage=storage.optuna(), sampler=sampler)
        # Stored trials, written the way the driver writes them (Optuna's add_trial checks
        # every parameter against the whole study: minutes for 5,000 trials of 37).
        storage_ = study._storage
        for _ in range(size):
            index = repair(costs, rng.integers(0, len(table.menu), len(table.names)), budget)
            plan = costs.plan(index)
            trial_id = storage_.create_new_trial(study._study_id)
            attrs = {ATTR_PLAN: plan, ATTR_BYTES: costs.bytes_of(index), ATTR_BPW: table.bpw(plan), ATTR_SOURCE: SAMPLED}
            write_trial(storage_, trial_id, {n: int(j) for n, j in zip(costs.names, index)}, space, attrs)
            storage_.set_trial_state_values(trial_id, TrialState.COMPLETE, [float(rng.random())])
        times = []
        for _ in range(args.timed):
            start = time.perf_counter()
            trial, plan = ask_plan(study, costs, table)  # the driver's own ask
            tell_plan(study, trial, [float(rng.random())])
            times.append(time.perf_counter() - start)
        optuna.delete_study(study_name=name, storage=storage.optuna())
        print(f"  {size:5d} stored trials: median {statistics.median(times) * 1e3:7.1f} ms per trial (target < 50 ms at 5,000)")


if __name__ == "__main__":
    main()
