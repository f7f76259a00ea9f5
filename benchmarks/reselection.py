"""Would re-scoring the search's top plans on more sentences pick a better plan on test?

Issue 16's searches select on the 128 evaluation sentences. Near the end of a search the top plans
differ on them by less than their noise: in one 3.0 bpw run (``tpe-evo``, seed 2) the ten best lay
within 0.5 % on evaluation and 4 % apart on test, and the one chosen was among the worst on test.
This takes the studies of a storage that ``benchmarks/search_quality.py --storage URL`` filled,
re-scores each study's ``--top`` best distinct plans on ``--fresh`` sentences that no split uses
(drawn from the same seeded permutation, just before the test split), and reports the test loss of
the plan each rule picks: the search's own (evaluation), the fresh sentences', both pooled, and
the best of the top on test itself (an oracle, for scale).

    .venv/bin/python benchmarks/search_quality.py --budgets 3.0bpw --samplers tpe-evo --trials 200 --repeats 5 --storage sqlite:////tmp/q/sel.db
    .venv/bin/python benchmarks/reselection.py --storage sqlite:////tmp/q/sel.db [--top 10] [--fresh 512]

The studies must come from the spec given by ``--study`` (default: the default study) with its
data section unchanged (no ``--evaluation`` or ``--oracle``): the test split is found again by
drawing it with the fresh sentences in front of it (the warm start's test loss, printed by
search_quality.py as its baseline's, shows it is the same split).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import median

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the storage search_quality.py wrote to")
    parser.add_argument("--study", default=str(STUDY), help="the spec the studies were searched on")
    parser.add_argument("--top", type=int, default=10, help="distinct plans re-scored per study, best on evaluation first")
    parser.add_argument("--fresh", type=int, default=512, help="fresh sentences, a multiple of data.batch_size")
    parser.add_argument("--only", default="", help="only the studies whose name contains this (e.g. tpe-evo)")
    args = parser.parse_args()

    from mpsearch.runtime.scorer import Scorer
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage, TrialLog
    from mpsearch.storage.trials import study_names
    from mpsearch.workload import Workload

    spec = Spec.load(args.study)
    batch, test = spec.data.batch_size, spec.data.test or spec.data.evaluation
    if args.fresh % batch:
        raise SystemExit(f"--fresh must be a multiple of data.batch_size ({batch})")
    # the test split is the last data.test examples before evaluation: a longer one has the fresh ones in front
    spec = spec.with_overrides(data={**spec.data.model_dump(), "test": test + args.fresh})
    scorer = Scorer(spec, workload=Workload(spec, device="cpu"))
    fresh_batches = args.fresh // batch
    storage = Storage(args.storage)
    summary = []
    for name in [n for n in study_names(storage) if args.only in n]:
        log = TrialLog.open(storage, name)
        seen, top = set(), []
        for t in sorted(log.complete(), key=lambda t: t.values[0]):
            if repr(t.plan) not in seen:
                seen.add(repr(t.plan))
                top.append(t)
            if len(top) == args.top:
                break
        rows = [(t.number, t.values[0], scorer.score(t.plan, "test", batches=(0, fresh_batches)), scorer.score(t.plan, "test", batches=(fresh_batches, None)))
                for t in top]
        print(f"\n{name}: its {len(rows)} best distinct plans on evaluation")
        print("| trial | evaluation | fresh | test |\n|---|---|---|---|")
        for row in rows:
            print("| {} | {:.5f} | {:.5f} | {:.5f} |".format(*row))
        picks = {
            "evaluation": rows[0],
            "fresh": min(rows, key=lambda r: r[2]),
            "pooled": min(rows, key=lambda r: r[1] * spec.data.evaluation + r[2] * args.fresh),
            "oracle": min(rows, key=lambda r: r[3]),
        }
        summary.append((name, {k: r[3] for k, r in picks.items()}))
    print("\n| study | test of the pick: by evaluation | by fresh | by pooled | oracle in the top | fresh x evaluation |")
    print("|---|---|---|---|---|---|")
    for name, t in summary:
        print(f"| {name} | {t['evaluation']:.5f} | {t['fresh']:.5f} | {t['pooled']:.5f} | {t['oracle']:.5f} | {t['fresh'] / t['evaluation']:.3f} |")
    if summary:
        ratios = [t["fresh"] / t["evaluation"] for _, t in summary]
        print(f"\nmedian fresh x evaluation over {len(ratios)} studies: {median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}); "
              f"better in {sum(r < 1 for r in ratios)}, worse in {sum(r > 1 for r in ratios)}")


if __name__ == "__main__":
    main()
