"""Sequential GPTQ and block-wise rounding of a uniform plan on an LLM, without a search.

A search of SmolLM2 on 2 cores takes hours; what the export's refinements do to an LLM does not
need one. Every layer of the study (default ``studies/smollm2.toml``) gets ``--bits`` at the
study's group size, and in one process:

* sequential GPTQ (``--refine sequential``): its time, and with ``--whole`` the time of the same
  refinement calibrated by a pass of the whole model per layer, the way it was done before each
  layer was fed by its block alone (the forms are checked to be bit for bit the same);
* + block-wise rounding (``--refine blockwise``), ``--steps`` steps a block, once for each count
  of tuning examples in ``--examples`` (``export.repair_examples``: the calibration split and the
  next examples of its draw; 0 for the study's own setting, the calibration split if unset).

It prints the study's loss (KL of the next-token distributions to the FP model for SmolLM2) on
the calibration and evaluation splits, and the seconds each step took.

    .venv/bin/python benchmarks/llm_refinement.py [--study studies/smollm2.toml] [--bits 4] [--steps 100] [--examples 0,448] [--whole] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent.parent / "studies" / "smollm2.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(STUDY))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="block-wise rounding's steps a block")
    parser.add_argument("--examples", default="0", help="tuning examples of block-wise rounding, comma-separated (0: the study's export.repair_examples, the calibration split if unset)")
    parser.add_argument("--whole", action="store_true", help="also time sequential GPTQ calibrated by whole-model passes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from mpsearch.quant.blockwise import blockwise_forms
    from mpsearch.quant.refine import sequential_forms
    from mpsearch.quant.repair import decode_into
    from mpsearch.spec import Spec
    from mpsearch.workload import Workload

    base = Spec.load(args.study)
    workload = Workload(base, device=args.device)
    table = workload.layer_table()
    bits = {name: args.bits for name in table.names}
    for split in ("calibration", "evaluation"):
        workload.reference(split)  # the FP model's, before any timing
    rows = []

    def score(label: str, model, seconds: float) -> None:
        rows.append((label, workload.loss(model, "calibration"), workload.loss(model), seconds))
        show(rows[-1:])

    start = time.perf_counter()
    forms, _ = sequential_forms(workload.build_model(), table, bits, workload.calibration_batches(), workload.forward)
    seconds = time.perf_counter() - start
    score(f"uniform {args.bits}-bit, sequential GPTQ (layers fed by their block)", decode_into(workload.build_model(), table, bits, forms), seconds)
    if args.whole:
        start = time.perf_counter()
        whole, _ = sequential_forms(workload.build_model(), table, bits, workload.calibration_batches(), workload.forward, by_blocks=False)
        seconds = time.perf_counter() - start
        same = all(torch.equal(forms[n][k], whole[n][k]) for n in forms for k in forms[n])
        rows.append((f"sequential GPTQ, a whole-model pass per layer ({'the same forms' if same else 'OTHER FORMS'})", None, None, seconds))
        show(rows[-1:])
    for count in (int(c) for c in args.examples.split(",") if c):
        spec = base if not count else base.with_overrides(export={**base.export.model_dump(), "repair_examples": count})
        tuning = Workload(spec, device=args.device) if count else workload
        batches = tuning.batches("repair")
        examples = sum(len(next(iter(b.values()))) for b in batches)
        model = workload.build_model()
        start = time.perf_counter()
        blockwise_forms(model, workload.fp_model(), table, bits, forms, batches, workload.forward, args.steps)
        score(f"+ block-wise rounding, {args.steps} steps a block, {examples} examples", model, time.perf_counter() - start)
    print()
    show(rows, header=True)


def show(rows, header: bool = False) -> None:
    if header:
        print("| step | calibration loss | evaluation loss | seconds |\n|---|---|---|---|")
    cell = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for label, calibration, evaluation, seconds in rows:
        print(f"| {label} | {cell(calibration)} | {cell(evaluation)} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
