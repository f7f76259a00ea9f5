"""What one search trial costs, and what spreading trials over Ray actors costs.

Trial overhead: one trial in a Scorer (swap the plan's cached tensors in, score the
evaluation set, restore) divided by one plain FP forward pass over the same evaluation
set. Target <= 1.15.

Distribution overhead: trials per second on 2 Ray actors of 1 CPU each, divided by trials
per second in one process with 2 torch threads, both scoring the same plans after a
warm-up (actor start-up is paid once per search and left out). Target >= 0.9.

Both on the default study's model and loss (MiniLM) with a smaller evaluation set, medians
of interleaved repeats.

    .venv/bin/python benchmarks/search_trials.py [--evaluation 64] [--repeats 5] [--plans 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluation", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plans", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("MPSEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="mpsearch-bench-"))

    from mpsearch.runtime import Scorer, ScorerPool
    from mpsearch.search.allocate import Costs, repair
    from mpsearch.spec import Spec
    from mpsearch.workload import Workload

    spec = Spec.load(STUDY).with_overrides(data={"calibration": 32, "evaluation": args.evaluation})
    workload = Workload(spec, device="cpu")
    workload.candidate_bank()
    table = workload.layer_table()
    costs = Costs.of(table, None)
    budget = table.budget_bytes(spec.budget.to_budget())
    rng = np.random.default_rng(0)
    plans = [repair(costs, rng.integers(0, len(table.menu), len(table.names)), budget) for _ in range(args.plans)]

    # -- trial overhead, in this process ------------------------------------------------
    torch.set_num_threads(os.cpu_count() or 1)
    scorer = Scorer(spec, snapshot=workload.snapshot())
    fp = workload.fp_model()
    batches = workload.evaluation_batches()

    def plain_forward():
        with torch.inference_mode():
            for batch in batches:
                workload.forward(fp, batch)

    plain_forward(); scorer.score(plans[0])  # warm-up
    trial_t, forward_t = [], []
    for i in range(args.repeats):
        t = time.perf_counter(); scorer.score(plans[i % len(plans)]); trial_t.append(time.perf_counter() - t)
        t = time.perf_counter(); plain_forward(); forward_t.append(time.perf_counter() - t)
    overhead = statistics.median(trial_t) / statistics.median(forward_t)

    # -- distribution overhead ------------------------------------------------------------
    local = ScorerPool(spec, workers=0, snapshot=workload.snapshot())
    ray_pool = ScorerPool(spec, workers=2, snapshot=workload.snapshot())
    ray_pool.map(plans[:2]); local.map(plans[:2])  # warm-up: actors up, banks loaded
    on_ray, in_process = [], []
    for _ in range(max(1, args.repeats // 2)):
        torch.set_num_threads(os.cpu_count() or 1)
        t = time.perf_counter(); ray_pool.map(plans); on_ray.append(len(plans) / (time.perf_counter() - t))
        t = time.perf_counter(); local.map(plans); in_process.append(len(plans) / (time.perf_counter() - t))
    ray_pool.close()
    distribution = statistics.median(on_ray) / statistics.median(in_process)

    print(f"MiniLM, {args.evaluation} evaluation sentences, {os.cpu_count()} cores")
    print(f"one trial (swap + evaluate + restore): median {statistics.median(trial_t) * 1e3:8.1f} ms")
    print(f"plain FP forward, same sentences     : median {statistics.median(forward_t) * 1e3:8.1f} ms")
    print(f"trial overhead ratio  : {overhead:.3f}   (target <= 1.15)")
    print(f"2 Ray actors x 1 CPU  : median {statistics.median(on_ray):6.2f} trials/s")
    print(f"1 process x {os.cpu_count()} threads  : median {statistics.median(in_process):6.2f} trials/s")
    print(f"distribution ratio    : {distribution:.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
