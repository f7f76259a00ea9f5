"""What the search driver costs per trial (ask + repair + tell) on PostgreSQL, at 100 and 5,000 stored trials.

The trial's evaluation is left out: this is the driver's own cost, the part that must not
grow into the bottleneck as a study gets long. The study has MiniLM's 37 layers and 5
widths; the stored trials are added in bulk (complete, with plans that fit), then the
driver's own path is timed: the repairing sampler's ask (TPE, multivariate, constant liar),
the plan's attributes, and the tell.

    .venv/bin/python benchmarks/driver_cost.py [--storage postgresql+psycopg://postgres@127.0.0.1:5432/test] [--sampler tpe] [--writes batched|optuna]
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
    parser.add_argument("--writes", default="batched", choices=["batched", "optuna"], help="the trial log's write path")
    parser.add_argument("--space", default="log-bits", choices=["log-bits", "menu-index"], help="how plans are Optuna parameters")
    args = parser.parse_args()

    import optuna

    from mpsearch.search.allocate import Costs, repair_index
    from mpsearch.search.sampler import SamplerContext, make_sampler
    from mpsearch.search.space import SPACES
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage, TrialLog
    from mpsearch.workload import Workload

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = Spec.load(STUDY)
    table = Workload(spec, device="cpu").layer_table()
    rng = np.random.default_rng(0)
    scores = {n: {b: float(rng.lognormal()) * 4.0 ** -(b - 2) for b in table.menu} for n in table.names}
    costs = Costs.of(table, scores)
    budget = table.budget_bytes(spec.budget.to_budget())
    storage = Storage(args.storage)

    print(f"driver cost per trial on {args.storage.split('@')[-1]}, sampler {args.sampler}, {len(table.names)} layers, writes {args.writes}, space {args.space}")
    for size in [int(x) for x in args.sizes.split(",")]:
        name = f"bench-driver-{size}-{uuid.uuid4().hex[:8]}"
        space = SPACES[args.space](costs, table)
        sampler = make_sampler(args.sampler, SamplerContext(0, costs, budget, space))
        log = TrialLog.create(storage, name, meta={"budget_bytes": budget}, space=space, sampler=sampler, writes=args.writes)
        # The stored trials: fixed plans that fit, written and told through the trial log.
        for _ in range(size):
            plan = costs.plan(repair_index(costs, rng.integers(0, len(table.menu), len(table.names)), budget))
            log.tell(log.ask(plan, {"source": "bench"}), [float(rng.random())])
        times = []
        for _ in range(args.timed):
            start = time.perf_counter()
            trial = log.ask()  # the driver's own ask: the sampler's proposal, repaired, written
            log.tell(trial, [float(rng.random())])
            times.append(time.perf_counter() - start)
        optuna.delete_study(study_name=name, storage=storage.optuna())
        print(f"  {size:5d} stored trials: median {statistics.median(times) * 1e3:7.1f} ms per trial (target < 50 ms at 5,000)")


if __name__ == "__main__":
    main()
