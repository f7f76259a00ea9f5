"""The perturbation scan from kept FP block outputs vs running every block, in one process.

A: ``perturbation_scores`` as it runs: each (layer, bits) plan starts from the kept FP output of
   the blocks before its layer (:mod:`mpsearch.workload.prefix`).
B: the same scan with the kept outputs switched off: every plan runs the whole model.
Same workload, same machine, alternating A and B; prints each one's median seconds, the ratio
A/B, the blocks A skipped, and checks that every score is the same to the bit.

    .venv/bin/python benchmarks/prefix_scan.py --model minilm [--calibration 32] [--repeats 3]
    .venv/bin/python benchmarks/prefix_scan.py --model smollm2 --calibration 4 --max-length 32 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

STUDIES = Path(__file__).resolve().parent.parent / "studies"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MPSEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="mpsearch-bench-"))

    from mpsearch.sensitivity.perturbation import perturbation_scores
    from mpsearch.spec import Spec
    from mpsearch.workload import Workload

    study = Spec.load(STUDIES / f"{args.model}.toml")
    spec = study.with_overrides(
        data={**study.data.model_dump(mode="json"), "calibration": args.calibration, "evaluation": 4, "test": 4, "max_length": args.max_length},
        quant={**study.quant.model_dump(mode="json"), "bits": [3, 8]},
    )
    Workload(spec, device="cpu").candidate_bank(progress=True)  # into the disk cache both sides read
    times: dict[bool, list[float]] = {True: [], False: []}
    scores, skipped, points = {}, 0, None
    for _ in range(args.repeats):
        for keep in (True, False):
            workload = Workload(spec, device="cpu")
            workload.candidate_bank()
            workload.fp_prefix().enabled = keep
            t = time.perf_counter()
            scores[keep] = perturbation_scores(workload, workers=0)
            times[keep].append(time.perf_counter() - t)
            if keep:
                skipped, points = workload.fp_prefix().skipped_blocks, workload.fp_prefix()._points.get("calibration")
    assert scores[True] == scores[False], "the scores differ"
    a, b = statistics.median(times[True]), statistics.median(times[False])
    jobs = sum(len(v) for v in scores[True].values())
    print(f"{args.model}, {jobs} (layer, bits) scores on {args.calibration} calibration examples x {args.max_length} tokens, {os.cpu_count()} cores, repeats {args.repeats}")
    print(f"A  from kept block outputs : median {a:7.1f} s  ({skipped} block forwards skipped; blocks kept: {len(points or [])})")
    print(f"B  every block             : median {b:7.1f} s")
    print(f"ratio A/B : {a / b:.2f}   every score the same to the bit")


if __name__ == "__main__":
    main()
