"""What each step after the search adds to a plan: the default study at several budgets.

For each budget (default: 4.125 and 3.125 bpw, the sizes of uniform 4- and 3-bit, and 3.0),
the default study (``studies/minilm.toml``) is searched (``--trials`` trials, its search
settings otherwise), and its best plan is exported three ways, in one process:

* plain: the plan's candidates, as the search scored them;
* + sequential: ``--refine sequential`` (GPTQ in forward order);
* + repair: ``--refine sequential --repair STEPS``.

For each it prints the loss on the evaluation split (selected on) and the test split (never
searched on), and the time the step took. The loss is the study's: 1 − cosine of mean-pooled
embeddings to the FP model. Uniform GPTQ at 4 and 3 bits is printed beside for scale.
Scheme options beyond bits (group sizes, asymmetric entries) are not built yet: no row.

    .venv/bin/python benchmarks/candidate_quality.py [--budgets 4.125,3.125,3.0] [--trials 64] [--repair 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4.125,3.125,3.0", help="bits per weight, comma-separated")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repair", type=int, default=100, help="repair steps")
    parser.add_argument("--storage", default=None, help="default: a new SQLite file in a temporary folder")
    args = parser.parse_args()

    from mpsearch.export import export_study
    from mpsearch.search.driver import Search
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage
    from mpsearch.workload import Workload

    folder = Path(tempfile.mkdtemp(prefix="mpsearch-candidates-"))
    storage = Storage(args.storage or f"sqlite:///{folder / 'mpsearch.db'}")
    rows = []
    for bpw in (float(b) for b in args.budgets.split(",")):
        spec = Spec.load(STUDY).with_overrides(budget=f"{bpw}bpw", search={"trials": args.trials, "workers": args.workers})
        name = f"candidates-{bpw}"
        start = time.perf_counter()
        outcome = Search(Workload(spec, device="cpu"), storage, study=name, progress=True).run()
        searched = time.perf_counter() - start
        for label, base in (("uniform-4", 4), ("uniform-3", 3)):
            if label in outcome.baselines and abs(outcome.baselines[label]["bpw"] - bpw) < 0.01:
                b = outcome.baselines[label]
                rows.append((bpw, f"uniform {base}-bit gptq", b["loss"], b.get("test_loss"), None))
        plain = export_study(storage, name, folder / f"{name}-plain", verify=False, refine="none")
        rows.append((bpw, f"plain plan ({args.trials} trials)", plain.loss, plain.test_loss, searched))
        refined = export_study(storage, name, folder / f"{name}-seq", verify=False, refine="sequential")
        r = refined.refinement
        rows.append((bpw, "+ sequential" + ("" if r["kept"] else " (not kept)"), r["loss_after"], r["test_loss_after"], r["seconds"]))
        repaired = export_study(storage, name, folder / f"{name}-rep", verify=False, refine="sequential", repair_steps=args.repair)
        p = repaired.repair
        rows.append((bpw, f"+ repair {args.repair} steps" + ("" if p["kept"] else " (not kept)"), p["loss_after"], p["test_loss_after"], p["seconds"]))

    print("\n| bpw | plan | evaluation loss | test loss | seconds |")
    print("|---|---|---|---|---|")
    for bpw, label, loss, test, seconds in rows:
        test_cell = "-" if test is None else f"{test:.5f}"
        print(f"| {bpw:g} | {label} | {loss:.5f} | {test_cell} | {'-' if seconds is None else f'{seconds:.0f}'} |")


if __name__ == "__main__":
    main()
