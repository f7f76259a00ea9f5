"""Does a sharper local search around the search's best plan gain anything on held-out sentences?

Each round measures the loss change of every single-layer step down and up the menu from the
current plan (:func:`~mpsearch.search.allocate.single_switches`, what the re-linearisation
measures), then scores the re-linearised ILP's plan and the ``--top`` budget-neutral pair switches
(one layer down, one up) whose measured changes add up lowest, and moves to the best of them if it
beats the current plan on evaluation. It stops after ``--rounds`` rounds or when nothing beats it.
The start and the end are then scored on the test split and on ``--test`` test sentences (the
default test split is the last 128 of those).

This takes the studies of a storage that ``benchmarks/search_quality.py --storage URL`` filled
from the default study as it ships (the data section unchanged), one process, no Ray:

    .venv/bin/python benchmarks/search_quality.py --budgets 3.0bpw --samplers tpe-evo --trials 200 --repeats 3 --storage sqlite:////tmp/q/a.db
    .venv/bin/python benchmarks/local_descent.py --storage sqlite:////tmp/q/a.db [--rounds 3] [--top 12] [--test 512]

``--oracle`` descends on the test split itself, the very sentences issue 16's targets are judged
on, and reports each end against the best baseline (warm start) on them: how far a local search
can get when selection noise is taken out, a ceiling for any search of this plan space from that
start. Its ``--test`` sentences hold the descended-on ones; it also prints the loss on the rest of
them, which are held out (from the two means: the loss is a mean over sentences).

The question it answers is whether the evaluation loss the search optimises still has real gains
in it once the search has run: on the default study's 128 evaluation sentences, a descent that
lowers it by a few percent more, yet scores no better on test, says the rest is their noise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def pair_switches(costs, index, down, up, budget: int) -> list[tuple[float, object]]:
    """Every plan one layer a step down and another a step up from ``index`` that fits ``budget``,
    with the sum of the two measured changes, lowest first."""
    import numpy as np

    down_to, up_to = costs.steps
    pairs = []
    for i in np.flatnonzero(np.isfinite(down)):
        for j in np.flatnonzero(np.isfinite(up)):
            if i == j:
                continue
            moved = index.copy()
            moved[i], moved[j] = down_to[i, index[i]], up_to[j, index[j]]
            if costs.bytes_of(moved) <= budget:
                pairs.append((float(down[i] + up[j]), moved))
    return sorted(pairs, key=lambda p: p[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the storage search_quality.py wrote to")
    parser.add_argument("--study", default=str(STUDY), help="the spec the studies were searched on")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="pair switches scored a round, lowest predicted first")
    parser.add_argument("--test", type=int, default=512, help="test sentences for the second judgement (the test split's are its last)")
    parser.add_argument("--evaluation", type=int, default=None, help="descend on this many evaluation sentences (data.evaluation; the "
                        "last ones of the draw, the study's own among them) and judge on the --test sentences just before them only")
    parser.add_argument("--oracle", action="store_true", help="descend on the test split itself and report against the best baseline on it")
    parser.add_argument("--only", default="", help="only the studies whose name contains this")
    args = parser.parse_args()

    import numpy as np

    from mpsearch.runtime.scorer import Scorer
    from mpsearch.search.allocate import Costs, relinearised, single_switches
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage, TrialLog
    from mpsearch.storage.trials import best_of, study_names
    from mpsearch.workload import Workload

    spec = Spec.load(args.study)
    if args.evaluation is not None:  # the default test split then lies inside evaluation: judged on the longer one only
        spec = spec.with_overrides(data={**spec.data.model_dump(), "evaluation": args.evaluation})
    workload = Workload(spec, device="cpu")
    scorer = Scorer(spec, workload=workload)
    longer = spec.with_overrides(data={**spec.data.model_dump(), "test": args.test})
    long_scorer = Scorer(longer, workload=Workload(longer, device="cpu"))
    costs = Costs.of(workload.layer_table(), None)
    storage = Storage(args.storage)
    split = "test" if args.oracle else "evaluation"
    rows = []
    for name in [n for n in study_names(storage) if args.only in n]:
        log = TrialLog.open(storage, name)
        budget = int(log.meta["budget_bytes"])
        best = best_of(log.complete(), budget)
        first = loss = best.loss if args.evaluation is None and not args.oracle else scorer.score(best.plan, split)
        index, evaluations, start = costs.index(best.plan), 0, time.perf_counter()
        print(f"\n{name}: from trial {best.number}, {split} {loss:.5f}", flush=True)
        for round_ in range(args.rounds):
            moves = single_switches(costs, index)
            down, up = np.full(len(index), np.nan), np.full(len(index), np.nan)
            for i, step, moved in moves:
                (down if step < 0 else up)[i] = scorer.score(costs.plan(moved), split) - loss
            proposals = [("pair", moved) for _, moved in pair_switches(costs, index, down, up, budget)[: args.top]]
            proposals.append(("ilp", costs.index(relinearised(costs, costs.plan(index), down, up, budget))))
            scored = sorted(((scorer.score(costs.plan(m), split), kind, m) for kind, m in proposals), key=lambda s: s[0])
            evaluations += len(moves) + len(proposals)
            better = sum(s[0] < loss for s in scored)
            print(f"  round {round_}: {better} of {len(scored)} proposals beat {loss:.5f}; the best {scored[0][0]:.5f} ({scored[0][1]}); "
                  f"{evaluations} evaluations, {time.perf_counter() - start:.0f} s", flush=True)
            if scored[0][0] >= loss:
                break
            loss, index = scored[0][0], scored[0][2]
        end = costs.plan(index)
        if args.oracle:
            bases = {t.source: scorer.score(t.plan, "test") for t in log.complete() if t.sources and t.finite and t.bytes <= budget}
            source, base = min(bases.items(), key=lambda kv: kv[1])
            print(f"  oracle: test {first:.5f} -> {loss:.5f}; the best baseline on test {base:.5f} ({source}): "
                  f"{first / base:.3f} x -> {loss / base:.3f} x", flush=True)
            # the --test sentences hold the test split's as their last; the loss is a mean over sentences
            n = spec.data.test or spec.data.evaluation  # the default: as many as evaluation
            rest = args.test - n
            held = [(args.test * long_scorer.score(p, "test") - n * scorer.score(p, "test")) / rest for p in (best.plan, end)]
            print(f"  the other {rest} of the {args.test} test sentences, held out: {held[0]:.5f} -> {held[1]:.5f} = {held[1] / held[0]:.3f} x", flush=True)
        row = (name, first, loss, *((scorer.score(best.plan, "test"), scorer.score(end, "test")) if args.evaluation is None else (float("nan"),) * 2),
               long_scorer.score(best.plan, "test"), long_scorer.score(end, "test"), evaluations)
        rows.append(row)
        print("  evaluation {1:.5f} -> {2:.5f}; test {3:.5f} -> {4:.5f}; test ({t}) {5:.5f} -> {6:.5f}".format(*row, t=args.test), flush=True)
    print(f"\n| study | evaluations | evaluation: start, end, x | test: start, end, x | test {args.test}: start, end, x |")
    print("|---|---|---|---|---|")
    for name, e0, e1, t0, t1, l0, l1, n in rows:
        print(f"| {name} | {n} | {e0:.5f}, {e1:.5f}, {e1 / e0:.3f} | {t0:.5f}, {t1:.5f}, {t1 / t0:.3f} | {l0:.5f}, {l1:.5f}, {l1 / l0:.3f} |")
    if len(rows) > 1:
        print(f"medians: evaluation x {median(r[2] / r[1] for r in rows):.3f}, test x {median(r[4] / r[3] for r in rows):.3f}, "
              f"test {args.test} x {median(r[6] / r[5] for r in rows):.3f}")


if __name__ == "__main__":
    main()
