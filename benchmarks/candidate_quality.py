"""What each step after the search adds to a plan: the default study at several budgets.

For each budget (default: 4.125 and 3.125 bpw, the sizes of uniform 4- and 3-bit, and 3.0),
the default study (``studies/minilm.toml``) is searched (``--trials`` trials, its search
settings otherwise) twice, and the best plans are exported, in one process:

* plain: the best plan of the study's menu (bits alone), its candidates as the search scored them;
* + scheme options: the best plan of a second search whose menu adds ``--options`` (``quant.options``:
  other group sizes, asymmetric entries), each at its exact bytes;
* + mse clipping: the best plan of a third search, with the options and ``quant.clip = "mse"`` (each
  group's range shrunk where that lowers its squared error): the default study as it ships
  (``--clip weighted``: that error weighted by each input's mean square);
* + sequential: that plan with ``--refine sequential`` (GPTQ in forward order);
* + block-wise rounding: ``--refine blockwise`` with ``export.blockwise_steps = --blockwise``
  (each block's rounding and scales learned against the FP model's block outputs, on the
  study's ``export.repair_examples``); ``--blockwise 0`` leaves it out;
* + repair: ``--refine blockwise --repair STEPS`` (``sequential`` with ``--blockwise 0``), on the study's loss alone
  (``export.repair_hidden = 0``) and with the hidden-state term (the default), a longer
  repair with it (``--long-repair``), and that longer repair tuned on more examples
  (``--repair-examples N,...``: ``export.repair_examples``, the calibration split and the next
  examples of its draw); ``--repair-lr`` and ``--repair-schedule`` set every repair's
  ``export.repair_lr`` and ``export.repair_schedule``, and ``--examples`` the
  ``export.repair_examples`` of block-wise rounding and every repair.

For each it prints the loss on the evaluation split (selected on) and the test split (never
searched on), and the time the step took. The loss is the study's: 1 − cosine of mean-pooled
embeddings to the FP model. Uniform GPTQ at 4 and 3 bits is printed beside for scale, and so is
each option alone at every layer (``--uniform``, one line per menu entry, evaluation and test,
under each clip rule of ``--clips``).

    .venv/bin/python benchmarks/candidate_quality.py [--budgets 4.125,3.125,3.0] [--trials 64] [--blockwise 200] [--repair 100] [--long-repair 400] [--repair-examples 512,2048] [--examples 6144] [--repair-lr 0.01] [--repair-schedule cosine] [--options 2a,3a,4a,2g64a,3g64a] [--clip-only] [--clip mse|weighted] [--uniform [--clips none,mse,weighted]] [--study SPEC] [--device cpu] [--profiles hessian]
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
    parser.add_argument("--blockwise", type=int, default=200, help="steps a block of --refine blockwise after sequential refinement, and the repairs start from it (0: sequential alone)")
    parser.add_argument("--repair", type=int, default=100, help="repair steps")
    parser.add_argument("--long-repair", type=int, default=400, help="steps of a longer repair, with the hidden-state term (0: none)")
    parser.add_argument("--repair-examples", default="", help="the longer repair again on each of these many examples (export.repair_examples), comma-separated")
    parser.add_argument("--examples", type=int, default=None, help="export.repair_examples of block-wise rounding and every repair (default: the study's)")
    parser.add_argument("--repair-lr", type=float, default=None, help="every repair's export.repair_lr (default: the study's)")
    parser.add_argument("--repair-schedule", default=None, choices=["constant", "cosine"], help="every repair's export.repair_schedule (default: the study's)")
    parser.add_argument("--storage", default=None, help="default: a new SQLite file in a temporary folder (a study already complete there is reused)")
    parser.add_argument("--options", default="2a,3a,4a,2g64a,3g64a", help="the scheme options of the second search, comma-separated")
    parser.add_argument("--uniform", action="store_true", help="also print every menu entry alone at every layer")
    parser.add_argument("--study", default=str(STUDY), help="the study spec (default: the default study); e.g. studies/smollm2.toml with --uniform --budgets \"\"")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--profiles", default=None, help="search.profiles, comma-separated (default: the study's); hessian alone skips the perturbation scan, hours for an LLM on a CPU")
    parser.add_argument("--clip", default="mse", choices=["mse", "weighted"], help="the clip rule of the third search and the steps after it")
    parser.add_argument("--clips", default="none,mse,weighted", help="--uniform: the quant.clip rules to compare, comma-separated")
    parser.add_argument("--clip-only", action="store_true", help="skip the first two searches: the + mse clipping search and the steps after it")
    args = parser.parse_args()

    from mpsearch.export import export_study
    from mpsearch.search.driver import Search
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage
    from mpsearch.workload import Workload

    folder = Path(tempfile.mkdtemp(prefix="mpsearch-candidates-"))
    storage = Storage(args.storage or f"sqlite:///{folder / 'mpsearch.db'}")
    rows = []
    base = Spec.load(args.study)
    base = base.with_overrides(quant={**base.quant.model_dump(), "options": [], "clip": "none"})  # the first search: bits alone
    options = [o for o in args.options.split(",") if o]
    quant = {**base.quant.model_dump(), "options": options}
    clipped = {**quant, "clip": args.clip}
    if args.uniform:
        uniform({rule: base.with_overrides(quant={**quant, "clip": rule}) for rule in args.clips.split(",")}, args.device)
    for bpw in (float(b) for b in args.budgets.split(",") if b):
        search = {**base.search.model_dump(), "trials": args.trials, "workers": args.workers, **({"profiles": args.profiles.split(",")} if args.profiles else {})}
        spec = base.with_overrides(budget=f"{bpw}bpw", search=search)
        name = f"candidates-{bpw}"
        start = time.perf_counter()
        outcome = None if args.clip_only else Search(Workload(spec, device=args.device), storage, study=name, progress=True, resume=True).run()
        searched = time.perf_counter() - start
        for label, bits in (("uniform-4", 4), ("uniform-3", 3)) if outcome is not None else ():
            if label in outcome.baselines and abs(outcome.baselines[label]["bpw"] - bpw) < 0.01:
                b = outcome.baselines[label]
                rows.append((bpw, f"uniform {bits}-bit gptq", b["loss"], b.get("test_loss"), None))
        if outcome is not None:
            plain = export_study(storage, name, folder / f"{name}-plain", verify=False, refine="none")
            rows.append((bpw, f"plain plan ({args.trials} trials)", plain.loss, plain.test_loss, searched))
        if options and not args.clip_only:
            name = f"candidates-{bpw}-options"
            start = time.perf_counter()
            Search(Workload(spec.with_overrides(quant=quant), device=args.device), storage, study=name, progress=True, resume=True).run()
            searched = time.perf_counter() - start
            chosen = export_study(storage, name, folder / f"{name}-plain", verify=False, refine="none")
            rows.append((bpw, f"+ scheme options {'/'.join(options)} ({args.trials} trials)", chosen.loss, chosen.test_loss, searched))
        name, quant = f"candidates-{bpw}-clip" + ("" if args.clip == "mse" else f"-{args.clip}"), clipped
        start = time.perf_counter()
        clip_outcome = Search(Workload(spec.with_overrides(quant=quant), device=args.device), storage, study=name, progress=True, resume=True).run()
        searched = time.perf_counter() - start
        for label, bits in (("uniform-4", 4), ("uniform-3", 3)):  # the clipped uniform plans
            if label in clip_outcome.baselines and abs(clip_outcome.baselines[label]["bpw"] - bpw) < 0.01:
                b = clip_outcome.baselines[label]
                rows.append((bpw, f"uniform {bits}-bit gptq, {args.clip} clip", b["loss"], b.get("test_loss"), None))
        chosen = export_study(storage, name, folder / f"{name}-plain", verify=False, refine="none")
        rows.append((bpw, f"+ {args.clip} clipping ({args.trials} trials)", chosen.loss, chosen.test_loss, searched))
        refined = export_study(storage, name, folder / f"{name}-seq", verify=False, refine="sequential")
        r = refined.refinement
        rows.append((bpw, "+ sequential" + ("" if r["kept"] else " (not kept)"), r["loss_after"], r["test_loss_after"], r["seconds"]))
        settings = {**spec.export.model_dump(), **({"repair_lr": args.repair_lr} if args.repair_lr else {}), **({"repair_schedule": args.repair_schedule} if args.repair_schedule else {}), **({"repair_examples": args.examples} if args.examples else {})}
        refine = "sequential"
        if args.blockwise:
            refine, settings = "blockwise", {**settings, "blockwise_steps": args.blockwise}
            blocked = export_study(storage, name, folder / f"{name}-blk", verify=False, refine=refine, spec=spec.with_overrides(quant=quant, export=settings))
            r = blocked.refinement
            rows.append((bpw, f"+ block-wise rounding, {args.blockwise} steps a block, {r['examples']} examples" + ("" if r["kept"] else " (not kept)"), r["loss_after"], r["test_loss_after"], r["seconds"]))
        tuned = spec.with_overrides(quant=quant, export=settings)
        rate = f", lr {tuned.export.repair_lr:g} {tuned.export.repair_schedule}"
        alone = spec.with_overrides(quant=quant, export={**settings, "repair_hidden": 0.0})
        runs = [(args.repair, f"the study's loss alone{rate}", alone), (args.repair, f"+ hidden states{rate}", tuned), (args.long_repair, f"+ hidden states{rate}", tuned)]
        for count in (int(c) for c in args.repair_examples.split(",") if c):
            more = spec.with_overrides(quant=quant, export={**settings, "repair_examples": count})
            runs.append((args.long_repair, f"+ hidden states, {count} examples{rate}", more))
        for i, (steps, label, override) in enumerate(runs):
            if not steps:
                continue
            repaired = export_study(storage, name, folder / f"{name}-rep-{steps}-{i}", verify=False, refine=refine, repair_steps=steps, spec=override)
            p = repaired.repair
            rows.append((bpw, f"+ repair {steps} steps, {label}" + ("" if p["kept"] else " (not kept)"), p["loss_after"], p["test_loss_after"], p["seconds"]))

        show(rows)  # after each budget too, so that a stopped run keeps what it measured

    show(rows)


def show(rows) -> None:
    print("\n| bpw | plan | evaluation loss | test loss | seconds |")
    print("|---|---|---|---|---|")
    for bpw, label, loss, test, seconds in rows:
        test_cell = "-" if test is None else f"{test:.5f}"
        print(f"| {bpw:g} | {label} | {loss:.5f} | {test_cell} | {'-' if seconds is None else f'{seconds:.0f}'} |", flush=True)


def uniform(specs: dict, device: str = "cpu") -> None:
    """Each menu entry at every layer: its bpw and its loss on evaluation and test, under each
    clip rule of ``specs`` (``{rule: spec}``)."""
    from mpsearch.workload import Workload

    losses = {}
    for spec in specs.values():
        workload = Workload(spec, device=device)
        table, bank, model = workload.layer_table(), workload.candidate_bank(progress=True), workload.lend_model()  # FP references first
        for width in table.menu:
            plan = table.uniform(width)
            with bank.applied(model, plan):
                losses.setdefault(width, [table.bpw(plan)]).extend([workload.loss(model), workload.loss(model, "test")])
    print("\n| entry | bpw | " + " | ".join(f"evaluation, clip {r} | test, clip {r}" for r in specs) + " |\n|---|---|" + "---|---|" * len(specs))
    for width, (bpw, *cells) in losses.items():
        print(f"| {width} | {bpw:.4f} | " + " | ".join(f"{c:.5f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
