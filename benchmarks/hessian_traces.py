"""What per-layer Hessian traces cost: all layers per probe vs one total trace vs a loop over layers.

(a) ``hessian_traces(mode="all")``, the default: for MiniLM's distillation loss the Gauss–Newton
    estimator, one backward pass of ⟨u, output⟩ per probe, every layer's trace.
(a') the same with ``estimator="hvp"``: one Hessian-vector product per probe over all layers,
    whose cross-layer terms are noise (shown for the record, not a target).
(b) ``total_trace``: one Hutchinson run for the whole trace, the kind PyHessian does.
(c) ``hessian_traces(mode="per-layer")``: one product per layer per probe.

All three on MiniLM (the default study's model and loss, a small calibration set so (c)
finishes), in one run, at the same tolerance and probe limits. Prints the seconds, the
products used, the ratios a/b and c/a, and the issue's targets (a/b ≤ 1.3, c/a ≥ L/1.3).

    .venv/bin/python benchmarks/hessian_traces.py [--calibration 16] [--max-length 64] [--tol 0.05]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from mpsearch.sensitivity import hessian
from mpsearch.spec import Spec
from mpsearch.workload import Workload

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--tol", type=float, default=hessian.DEFAULT_TOL)
    parser.add_argument("--max-probes", type=int, default=hessian.DEFAULT_MAX_PROBES)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    spec = Spec.load(STUDY).with_overrides(data={"calibration": args.calibration, "evaluation": 8, "max_length": args.max_length, "batch_size": 16})
    w = Workload(spec, device=args.device)
    w.reference("calibration")
    layers = len(w.layer_table().layers)
    opts = dict(tol=args.tol, max_probes=args.max_probes)

    t = time.perf_counter(); a = hessian.hessian_traces(w, mode="all", **opts); ta = time.perf_counter() - t
    t = time.perf_counter(); a2 = hessian.hessian_traces(w, mode="all", estimator="hvp", **opts); ta2 = time.perf_counter() - t
    t = time.perf_counter(); total, stderr, probes_b = hessian.total_trace(w, **opts); tb = time.perf_counter() - t
    t = time.perf_counter(); c = hessian.hessian_traces(w, mode="per-layer", **opts); tc = time.perf_counter() - t

    print(f"MiniLM, {layers} layers, {args.calibration} calibration sentences x {args.max_length} tokens, tol {args.tol}, max probes {args.max_probes}")
    print(f"(a) all layers per probe : {ta:8.1f} s  {a.products:5d} products   sum of traces {sum(a.trace.values()):.1f}   ({a.estimator})")
    print(f"(a') all at once, hvp    : {ta2:8.1f} s  {a2.products:5d} products   sum of traces {sum(a2.trace.values()):.1f}   "
          f"(layers at the probe limit: {sum(p >= args.max_probes for p in a2.probes.values())})")
    print(f"(b) total trace only     : {tb:8.1f} s  {probes_b:5d} products   trace {total:.1f} ± {stderr:.1f}")
    print(f"(c) one layer per product: {tc:8.1f} s  {c.products:5d} products   sum of traces {sum(c.trace.values()):.1f}")
    worst = max((a.stderr[n] / a.trace[n] for n in a.trace if a.trace[n] > 0), default=0.0)
    print(f"(a) layers at the probe limit: {sum(p >= args.max_probes for p in a.probes.values())}; worst relative stderr {worst:.3f}")
    print(f"ratio a/b : {ta / tb:.2f}   (target <= 1.3)")
    print(f"ratio c/a : {tc / ta:.2f}   (target >= {layers / 1.3:.1f} = layers / 1.3)")
    print(f"ratio a'/b: {ta2 / tb:.2f}   c/a': {tc / ta2:.2f}   (hvp all at once, for the record)")
    rel = [abs(a.trace[n] - c.trace[n]) / c.trace[n] for n in a.trace if c.trace[n] > 0]
    print(f"(a) vs (c) per layer: median relative difference {statistics.median(rel):.3f}, max {max(rel):.3f}")


if __name__ == "__main__":
    main()
