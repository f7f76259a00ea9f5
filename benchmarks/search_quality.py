"""What the search finds against the allocations it is warm-started from, at 3.0 and 4.0 bpw.

For each budget (scales included, the byte ledger of DESIGN.md) one study on the default
MiniLM study of ``--trials`` trials on 2 Ray actors, then the evaluation loss of: every
uniform plan that fits, ILP on the Hessian score Ω, ILP on the perturbation Δloss, greedy,
and the search's best after 50, 100 and 200 trials. Issue 16's targets: the best <= 0.80 x the
best baseline at 3.0 bpw and <= 0.85 x at 4.0 bpw on the test split, at equal wall time.

    .venv/bin/python benchmarks/search_quality.py [--trials 200] [--budgets 3.0bpw,4.0bpw] [--sampler tpe]
        [--pruner race] [--stages 0.25,1.0] [--relinearise-every 32] [--space menu-index]
        [--study studies/smollm2.toml] [--profiles hessian] [--workers 0] [--options 2a,3a,4a] [--clip mse] [--seed 1]
        [--screen 64] [--patience 32] [--evaluation 512] [--oracle] [--repeats 5]

``--study`` searches another spec (e.g. the SmolLM2 study); ``--profiles hessian`` sets
``search.profiles``, leaving out the perturbation scan (about 1,700 calibration passes for
SmolLM2, hours on a CPU), its ILP and the greedy plan. ``--options`` and ``--clip`` set
``quant.options`` and ``quant.clip`` (the candidates, hence the bank and the profiles: match
another benchmark's to reuse what it built). ``--screen`` and ``--patience`` set
``search.screen`` and ``search.patience`` (the screened samplers' children per proposal, and
tpe-evo's hand-over); ``--evaluation`` sets ``data.evaluation`` (and so the test split's size).
``--oracle`` searches on the test split itself (an oracle no real search has): its evaluation
ratio is what selecting on the very examples the targets are judged on reaches.

Each budget also reports the best and the best baseline on the test split (never searched on),
which is the figure the targets are judged on, and the search's wall time: compare samplers,
pruners and re-linearisation at equal time, not equal trials (a pruned trial is cheap).

Each budget in bits per weight also scores the uniform plan at its whole bits (uniform 3-bit,
3.125 bpw, at 3.0 bpw) on both splits, once. Issue 16 asks the 3.0 bpw plan to beat it on test at
less memory: the tables give each best's test loss against it, and whether it is both smaller and
better on test (the medians count such runs).

``--samplers tpe,evo,evo+race,random,nsga2`` runs one search per sampler (``+race`` adds that
pruner) at every budget, same seed and trials, and ends with the README's table: sampler x budget x
wall time (first trial's start to last trial's end: the bank and profiles, built once, are left
out) x evaluation loss x test loss of the best, and each against the best baseline.

``--equal-time`` compares at equal wall time, as issue 16 asks ("after the same wall-clock time
as 200 full trials"): at each budget the first of ``--samplers`` (give one without a pruner,
e.g. ``tpe`` or ``evo``) runs ``--trials`` full trials, and every later one gets that run's
trial span as its ``search.time_limit_s``, with ``--trials`` raised twentyfold as a cap only. A
pruned sampler then runs as many cheap trials as fit in the time.

``--samplers tpe-evo,tpe-evo-screened --equal-time`` weighs the screen (each level-switch child the
best of 64 by a model fitted to the trials) against plain level switches; ``--seed`` repeats a
comparison on another seed.

``--repeats N`` runs the whole comparison N times, the search seed going up by one each time
(the data splits, hence the baselines, stay the same), and ends with each sampler's median over
the runs at each budget, with the range. With ``--equal-time`` each repeat gets its own time limit
from its own first run, so the samplers are compared in pairs run minutes apart. A seeded run on
the default study's 128 evaluation sentences reproduces (the driver's synchronous rounds are told
in trial order), but runs on different seeds differ by up to 8 % on test: a sampler choice rests
on the medians.

``--space menu-index`` makes the study as mpsearch 0.1.0 did, each layer's parameter an index
into the menu instead of its bits on a log scale (:mod:`mpsearch.search.space`): TPE on both,
same seed, shows whether the encoding Optuna's tools can read costs the sampler anything.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def oracle_source(spec) -> str:
    """A JSON-lines file of ``spec``'s test split (the same draw as the search's), for ``--oracle``."""
    import json

    from mpsearch.workload.data import split

    test = split(spec.data, spec.resolve)[2]
    if test.texts is None or not len(test):
        raise SystemExit("--oracle needs a study with a text test split")
    path = Path(tempfile.mkdtemp(prefix="mpsearch-oracle-")) / "test.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in test.texts))
    return str(path)


def uniform_reference(spec) -> dict | None:
    """The uniform plan at the budget's whole bits (uniform 3-bit for 3.0 bpw), when they are on the
    menu: its bits, bytes, bpw and losses on evaluation and test. Issue 16 asks the 3.0 bpw plan to
    beat it on test at less memory. A fresh workload, since scoring a whole plan gives the FP
    weights up."""
    from mpsearch.runtime.scorer import Scorer
    from mpsearch.workload import Workload

    if spec.budget.bpw is None:
        return None
    workload = Workload(spec, device="cpu")
    table = workload.layer_table()
    bits = int(spec.budget.bpw)
    if bits not in table.menu:
        return None
    plan = table.uniform(bits)
    scorer = Scorer(spec, workload=workload)
    return {"bits": bits, "bytes": table.bytes(plan), "bpw": table.bpw(plan),
            "loss": scorer.score(plan, "evaluation"), "test_loss": scorer.score(plan, "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--budgets", default="3.0bpw,4.0bpw")
    parser.add_argument("--sampler", default=None, choices=[None, "tpe", "nsga2", "random", "evo", "tpe-evo", "tpe-evo-screened", "evo-screened"])
    parser.add_argument("--samplers", default=None, help="compare: comma-separated samplers, each optionally +PRUNER (e.g. tpe,evo,evo+race)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None, help="search.seed (default: the study's)")
    parser.add_argument("--pruner", default=None, help="search.pruner (none, race, forecast, halving, percentile)")
    parser.add_argument("--stages", default=None, help="search.stages, comma-separated fractions (e.g. 0.25,1.0)")
    parser.add_argument("--relinearise-every", type=int, default=None)
    parser.add_argument("--storage", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--study", default=str(STUDY), help="the study spec (default: the default study)")
    parser.add_argument("--profiles", default=None, help="search.profiles, comma-separated (default: the study's)")
    parser.add_argument("--options", default=None, help="quant.options, comma-separated (default: the study's)")
    parser.add_argument("--clip", default=None, choices=["none", "mse", "weighted"], help="quant.clip (default: the study's)")
    parser.add_argument("--equal-time", action="store_true", help="later samplers get the first's trial span as their time limit (see above)")
    parser.add_argument("--time-limit", type=float, default=None, help="search.time_limit_s for every run (seconds of trials; e.g. another run's span)")
    parser.add_argument("--screen", type=int, default=None, help="search.screen (default: the study's)")
    parser.add_argument("--patience", type=int, default=None, help="search.patience (default: the study's)")
    parser.add_argument("--evaluation", type=int, default=None, help="data.evaluation (default: the study's)")
    parser.add_argument("--test", type=int, default=None, help="data.test (default: the study's, which is data.evaluation's size)")
    parser.add_argument("--oracle", action="store_true", help="search on the study's test split itself (data.eval_source = its test examples): "
                        "what selecting on the very examples the target is judged on reaches; the evaluation ratio is then the test ratio")
    parser.add_argument("--repeats", type=int, default=1, help="run the comparison N times, seeds seed..seed+N-1, and report medians")
    parser.add_argument("--space", default="log-bits", choices=["log-bits", "menu-index"], help="how plans are Optuna parameters")
    args = parser.parse_args()

    from mpsearch.search.driver import Search
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage, TrialLog
    from mpsearch.storage.trials import SAMPLED
    from mpsearch.workload import Workload

    url = args.storage or f"sqlite:///{tempfile.mkdtemp(prefix='mpsearch-quality-')}/quality.db"
    storage = Storage(url)
    checkpoints = [k for k in (50, 100, 200) if k <= args.trials] + ([args.trials] if args.trials not in (50, 100, 200) else [])
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    first_seed = args.seed if args.seed is not None else Spec.load(args.study).search.seed
    runs = [(repeat, budget, *(choice.split("+") + [args.pruner])[:2]) for repeat in range(args.repeats)
            for budget in args.budgets.split(",") for choice in (args.samplers or str(args.sampler)).split(",")]
    table = []
    references: dict[str, dict | None] = {}  # each budget's uniform plan at its whole bits, scored once
    spans: dict[tuple[int, str], float] = {}  # each repeat's first run's trial span at each budget (--equal-time)
    for repeat, budget, sampler, pruner in runs:
        seed = first_seed + repeat if args.repeats > 1 else args.seed
        spec = Spec.load(args.study).with_overrides(budget=budget)
        quant = {**({"options": [o for o in args.options.split(",") if o]} if args.options is not None else {}), **({"clip": args.clip} if args.clip else {})}
        spec = spec.with_overrides(quant={**spec.quant.model_dump(), **quant})
        if args.evaluation is not None:
            spec = spec.with_overrides(data={**spec.data.model_dump(), "evaluation": args.evaluation})
        if args.test is not None:
            spec = spec.with_overrides(data={**spec.data.model_dump(), "test": args.test})
        if args.oracle:
            spec = spec.with_overrides(data={**spec.data.model_dump(), "eval_source": oracle_source(spec), "evaluation": spec.data.evaluation, "test": None})
        overrides = {"sampler": None if sampler == "None" else sampler, "pruner": pruner, "relinearise_every": args.relinearise_every,
                     "stages": [float(x) for x in args.stages.split(",")] if args.stages else None,
                     "profiles": args.profiles.split(",") if args.profiles else None, "seed": seed,
                     "screen": args.screen, "patience": args.patience}
        spec = spec.with_overrides(search={**spec.search.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
        workload = Workload(spec, device="cpu")
        name = f"quality-{budget}-{spec.search.sampler}-{int(time.time())}"
        limit = spans.get((repeat, budget)) if args.equal_time else args.time_limit
        search = Search(workload, storage, study=name, trials=args.trials * (20 if limit else 1), workers=args.workers, time_limit_s=limit)
        if args.space != "log-bits":  # the older encoding, for comparison: the study records it and the search uses it
            made = search.meta
            search.meta = lambda made=made: {**made(), "space": args.space}
        start = time.perf_counter()
        result = search.run()
        seconds = time.perf_counter() - start
        log = TrialLog.open(storage, name)
        trials = log.complete()
        s = spec.search
        stamped = [t for t in log.records() if t.started and t.finished]
        # the trials' own span: the bank and the sensitivity profiles, built once per machine and study, left out
        span = (max(t.finished for t in stamped) - min(t.started for t in stamped)).total_seconds() if stamped else seconds
        spans.setdefault((repeat, budget), span)
        space = search.meta().get("space", "log-bits")
        print(f"\n{spec.name} at {budget} = {search.budget:,} bytes, sampler {s.sampler}, pruner {s.pruner} (stages {s.stages}), "
              f"re-linearised every {s.relinearise_every or '-'}, space {space}, seed {s.seed}: {len(trials)} complete + {result.n_pruned} pruned trials in {span:.0f} s "
              f"({seconds:.0f} s with the setup{f'; time limit {limit:.0f} s' if limit else ''})")
        test_base = min((b["test_loss"] for b in result.baselines.values() if "test_loss" in b), default=math.nan)
        eval_base = min(b["loss"] for b in result.baselines.values())
        if budget not in references:
            references[budget] = uniform_reference(spec)
        ref = references[budget]
        if ref:
            print(f"  uniform {ref['bits']}-bit: loss {ref['loss']:.5f}, test {ref['test_loss']:.5f}, bytes {ref['bytes']:,} ({ref['bpw']:.3f} bpw)")
        if result.best:
            best_test = result.best.get("test_loss", math.nan)
            table.append((s.sampler + ("" if s.pruner == "none" else f" + {s.pruner}"), budget, span, len(trials), result.n_pruned,
                          result.best["loss"], result.best["loss"] / eval_base, result.best.get("test_loss", math.nan),
                          result.best.get("test_loss", math.nan) / test_base, result.best.get("source", ""), s.seed,
                          best_test / ref["test_loss"] if ref else math.nan, bool(ref) and best_test < ref["test_loss"] and result.best["bytes"] < ref["bytes"]))
        if result.best and "test_loss" in result.best:
            print(f"  test split: best {result.best['test_loss']:.5f} vs best baseline {test_base:.5f} = {result.best['test_loss'] / test_base:.3f} x")
        best_baseline = min(b["loss"] for b in result.baselines.values())
        for name, row in sorted(result.baselines.items(), key=lambda kv: kv[1]["loss"]):
            print(f"  {name:18s} loss {row['loss']:.5f}  bytes {row['bytes']:>12,}  bpw {row['bpw']:.3f}")
        for k in sorted({*(c for c in checkpoints if c < len(trials)), len(trials)} - {0}):  # a timed run may end anywhere
            first = trials[:k]
            best = min(first, key=lambda t: t.loss)
            sampled = [t for t in first if t.source == SAMPLED]
            print(
                f"  search best @{k:<4d} loss {best.loss:.5f}  ({best.source}, trial {best.number})"
                f"  = {best.loss / best_baseline:.3f} x best baseline; best sampled {min((t.loss for t in sampled), default=math.nan):.5f}"
            )
        sampled = sorted(t.loss for t in trials if t.source == SAMPLED)
        if sampled:
            half = sampled[len(sampled) // 2]
            print(f"  sampled trials: {len(sampled)}, median loss {half:.5f}, best quarter's mean {sum(sampled[: max(1, len(sampled) // 4)]) / max(1, len(sampled) // 4):.5f}")
    if len(table) > 1:
        print("\n| sampler | budget | wall time | complete + pruned | best, evaluation | x best baseline | best, test | x best baseline | best's source | seed | test x uniform at the budget's bits | smaller and better on test |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in table:
            print("| {} | {} | {:.0f} s | {} + {} | {:.5f} | {:.3f} | {:.5f} | {:.3f} | {} | {} | {:.3f} | {} |".format(*row[:12], "yes" if row[12] else "no"))
    if args.repeats > 1:
        print_medians(table)


def print_medians(table: list[tuple]) -> None:
    """Each (sampler, budget)'s median over the repeats: wall time, trials, and both ratios with their range."""
    from statistics import median

    cells: dict[tuple[str, str], list[tuple]] = {}
    for row in table:
        cells.setdefault((row[0], row[1]), []).append(row)
    print("\n| sampler | budget | runs | wall time | complete + pruned | x best baseline, evaluation | x best baseline, test "
          "| test x uniform at the budget's bits | runs better on test at less memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (sampler, budget), rows in cells.items():
        ev, te, un = [r[6] for r in rows], [r[8] for r in rows], [r[11] for r in rows]
        print(f"| {sampler} | {budget} | {len(rows)} | {median(r[2] for r in rows):.0f} s | {median(r[3] for r in rows):.0f} + {median(r[4] for r in rows):.0f} "
              f"| {median(ev):.3f} ({min(ev):.3f}-{max(ev):.3f}) | {median(te):.3f} ({min(te):.3f}-{max(te):.3f}) "
              f"| {median(un):.3f} ({min(un):.3f}-{max(un):.3f}) | {sum(r[12] for r in rows)} of {len(rows)} |")


if __name__ == "__main__":
    main()
