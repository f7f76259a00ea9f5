"""The perturbation scan over Ray workers vs in one process, and how it agrees with HAWQ.

A: the (layer, bits) scan on 2 Ray actors (local Ray, one core each).
B: the same scan in this process, torch using both cores.
Both on MiniLM's default study model and loss; prints the medians' ratio B/A (the issue
asks A to run at least 0.9x as fast as B, i.e. B/A >= 0.9), and the Spearman rank
correlation of the Hessian score Ω and Δloss at 3 bits across layers.

    .venv/bin/python benchmarks/perturbation_scan.py [--calibration 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mpsearch.spec import Spec
from mpsearch.workload import Workload

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("MPSEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="mpsearch-bench-"))

    from scipy.stats import spearmanr

    from mpsearch.sensitivity import hessian
    from mpsearch.sensitivity.perturbation import perturbation_scores

    spec = Spec.load(STUDY).with_overrides(data={"calibration": args.calibration, "evaluation": 8, "max_length": args.max_length, "batch_size": 16})
    w = Workload(spec, device="cpu")
    w.candidate_bank()
    ray_times, local_times = [], []
    for _ in range(args.repeats):
        t = time.perf_counter(); on_ray = perturbation_scores(w, workers=args.workers); ray_times.append(time.perf_counter() - t)
        t = time.perf_counter(); local = perturbation_scores(w, workers=0); local_times.append(time.perf_counter() - t)
    for name in on_ray:
        for bits in on_ray[name]:
            assert abs(on_ray[name][bits] - local[name][bits]) <= 1e-6 + 1e-4 * abs(local[name][bits]), (name, bits)
    a, b = statistics.median(ray_times), statistics.median(local_times)
    jobs = sum(len(v) for v in local.values())
    print(f"MiniLM, {jobs} (layer, bits) jobs on {args.calibration} calibration sentences x {args.max_length} tokens, repeats {args.repeats}")
    print(f"A  {args.workers} Ray workers (incl. actor start) : median {a:7.1f} s")
    print(f"B  one process, {os.cpu_count()} threads           : median {b:7.1f} s")
    print(f"ratio B/A : {b / a:.2f}   (target >= 0.9)")

    traces = hessian.hessian_traces(w)
    omega = hessian.hawq_scores(traces, w.candidate_bank())
    names = [n for n in local if n != "pooler.dense"]  # zero under both: it would only add a tie
    rho = spearmanr([omega[n][3] for n in names], [local[n][3] for n in names]).statistic
    print(f"Spearman(HAWQ Ω, Δloss) at 3 bits over {len(names)} layers: {rho:.3f}")


if __name__ == "__main__":
    main()
