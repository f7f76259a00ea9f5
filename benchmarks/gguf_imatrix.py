"""What ``target.imatrix`` buys on SmolLM2, measured by llama.cpp itself.

The SmolLM2 study (``studies/smollm2.toml``'s model and data) in llama.cpp's types, with and
without an importance matrix from its calibration split: for uniform plans at each level (Q2_K,
Q3_K, Q4_K where rows are a multiple of 256, i.e. ``down_proj``; IQ4_NL on the rows of 576, which
take no K-quant), the export's GGUF is written with ``target_gguf.write`` (every block checked to
be the bank's candidate) and scored with ``llama-perplexity`` on the evaluation paragraphs, next to
the F16 plan. Ratios are perplexity with the matrix / without it, same machine, same run.

    .venv/bin/python benchmarks/gguf_imatrix.py [--levels 2,3,4] [--calibration 128] [--evaluation 128]

Needs ``mpsearch toolchain llama.cpp``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent.parent / "studies" / "smollm2.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="2,3,4")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--evaluation", type=int, default=128)
    args = parser.parse_args()

    from mpsearch.export.targets import gguf as target_gguf
    from mpsearch.quant import llama_cpp
    from mpsearch.spec import Spec
    from mpsearch.workload import Workload
    from mpsearch.workload.data import split

    levels = [int(b) for b in args.levels.split(",")]
    study = Spec.load(STUDY)
    data = {**study.data.model_dump(mode="json"), "calibration": args.calibration, "evaluation": args.evaluation}
    quant = {**study.quant.model_dump(mode="json"), "bits": sorted({*levels, 4, 16})}
    folder = Path(tempfile.mkdtemp(prefix="mpsearch-imatrix-bench-"))
    llama = llama_cpp.tools()
    rows = []
    for imatrix in (False, True):
        spec = study.with_overrides(data=data, quant=quant, target={"format": "gguf", "imatrix": imatrix})
        workload = Workload(spec, device="cpu")
        start = time.perf_counter()
        bank = workload.candidate_bank(cache_dir=folder / "banks")
        built = time.perf_counter() - start
        text = "\n\n".join(split(spec.data, spec.resolve)[1].texts)
        n_ctx = min(spec.data.max_length, 512)
        table = workload.layer_table()
        for level in [*levels, 16]:
            if imatrix and level == 16:
                continue
            out = folder / f"{'imatrix' if imatrix else 'plain'}-{level}"
            out.mkdir()
            plan = table.uniform(level)
            target_gguf.write(out, workload, plan, bank)
            ppl = llama_cpp.perplexity(llama, out / target_gguf.FILE, text, n_ctx)
            rows.append((level, imatrix, table.bpw(plan), ppl))
            print(f"level {level:2d} {'imatrix' if imatrix else 'plain  '} {table.bpw(plan):.4f} bpw  llama-perplexity {ppl:.4f}", flush=True)
        print(f"(bank {'with' if imatrix else 'without'} the matrix built in {built:.0f} s)")
    plain = {level: ppl for level, im, _, ppl in rows if not im}
    print("\n| level | bpw | perplexity, plain | with imatrix | ratio |\n|---|---|---|---|---|")
    for level, im, bpw, ppl in rows:
        if im:
            print(f"| {level} | {bpw:.3f} | {plain[level]:.3f} | {ppl:.3f} | {ppl / plain[level]:.3f} |")
    print(f"| 16 | 16.000 | {plain[16]:.3f} | | |")


if __name__ == "__main__":
    main()
