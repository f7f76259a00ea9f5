"""What caching the FP reference outputs buys: scoring one model on the evaluation set.

A: ``Workload.loss`` as mpsearch runs it, the FP outputs computed once and reused.
B: the same loss with the FP model re-run for every evaluation (what a naive search does).

Both run in one process, interleaved, on the default study's model and data; the script
prints the median of each and the ratio B / A. Run from the repository root:

    .venv/bin/python benchmarks/reference_reuse.py [--repeats 7] [--evaluation 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mpsearch.spec import Spec
from mpsearch.workload import Workload

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def naive_loss(w: Workload, model) -> float:
    total = count = 0.0
    with torch.no_grad():
        fp = w.fp_model()
        for batch in w.evaluation_batches():
            ref = w.forward(fp, batch)
            t, c = w.loss_fn(w.forward(model, batch), ref, batch)
            total, count = total + float(t), count + float(c)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--evaluation", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    spec = Spec.load(STUDY).with_overrides(data={"calibration": 8, "evaluation": args.evaluation})
    w = Workload(spec, device=args.device)
    model = w.build_model()
    w.loss(model)  # warm-up; also fills the reference cache, as the first trial of a search does

    cached, naive = [], []
    for _ in range(args.repeats):
        t = time.perf_counter(); a = w.loss(model); cached.append(time.perf_counter() - t)
        t = time.perf_counter(); b = naive_loss(w, model); naive.append(time.perf_counter() - t)
        assert abs(a - b) < 1e-6, (a, b)
    a, b = statistics.median(cached), statistics.median(naive)
    print(f"evaluation examples: {args.evaluation}, device: {args.device}, repeats: {args.repeats}")
    print(f"A cached reference : median {a * 1000:8.1f} ms")
    print(f"B recomputed       : median {b * 1000:8.1f} ms")
    print(f"ratio B/A          : {b / a:.2f}x")


if __name__ == "__main__":
    main()
