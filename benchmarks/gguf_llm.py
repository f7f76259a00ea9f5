"""The gguf target on an LLM (SmolLM2-135M-Instruct) against llama.cpp's presets, in llama.cpp.

The SmolLM2 study's model, data and loss (``studies/smollm2.toml``; fewer examples by default, to
fit a 2-core machine) searched with ``[target] format = "gguf"`` (optionally ``imatrix = true``) at
each budget, in llama.cpp's real bytes per linear weight, and exported to a GGUF. llama.cpp's
presets are made from the same F32 GGUF with ``llama-quantize`` (token embeddings kept at F32, as
the export keeps them, so only the linear layers differ; with the same importance matrix when
``--imatrix``). Every file is scored the same way, on the **test split** (no trial was selected on
it): ``llama-perplexity`` over the test paragraphs, against the F32 GGUF's.

SmolLM2's hidden size is 576, not a multiple of 256: llama.cpp's K-quants reach only ``down_proj``
(rows of 1536); its presets fall back to IQ4_NL / Q5_0 / Q5_1 / Q8_0 on the other tensors.

    .venv/bin/python benchmarks/gguf_llm.py [--budgets 4.5,5.0] [--trials 32] [--examples 32] [--imatrix]

Needs ``mpsearch toolchain llama.cpp``. Measured cost on 2 CPU cores (32 paragraphs a split): the
search's sensitivity phase alone, 48 Hessian probes (~20 s each) then a perturbation scan of
931 single-layer plans (~4 s each), takes well over an hour: run it on a GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent.parent / "studies" / "smollm2.toml"
PRESETS = ("Q2_K", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "Q5_K_M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4.5,5.0", help="bits per linear weight, comma-separated")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--examples", type=int, default=32, help="calibration, evaluation and test paragraphs each")
    parser.add_argument("--imatrix", action="store_true", help="target.imatrix, and the presets with the same matrix")
    args = parser.parse_args()

    from mpsearch.export import export_study
    from mpsearch.quant import llama_cpp
    from mpsearch.quant.gguf import GGUF_LEVELS, gguf_tensor
    from mpsearch.quant.gguf_file import read_gguf
    from mpsearch.search.driver import Search
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage
    from mpsearch.workload import Workload
    from mpsearch.workload.data import split

    llama = llama_cpp.tools()
    folder = Path(tempfile.mkdtemp(prefix="mpsearch-gguf-llm-bench-"))
    storage = Storage(f"sqlite:///{folder / 'mpsearch.db'}")
    study = Spec.load(STUDY)
    n = args.examples
    base_spec = study.with_overrides(
        data={**study.data.model_dump(mode="json"), "calibration": n, "evaluation": n, "test": n},
        quant={**study.quant.model_dump(mode="json"), "bits": list(GGUF_LEVELS)},
        target={"format": "gguf", "imatrix": args.imatrix},
    )
    workload = Workload(base_spec, device="cpu")
    table = workload.layer_table()
    linear = {f"{gguf_tensor(layer.name)}.weight" for layer in table.layers}
    test_text = "\n\n".join(split(base_spec.data, base_spec.resolve)[2].texts)
    n_ctx = min(base_spec.data.max_length, 512)
    f32 = llama.convert(workload.source_dir(), folder / "smollm2-f32.gguf", "f32")
    bank = workload.candidate_bank(progress=True)  # the imatrix (if any) the presets use too

    def score(path: Path) -> tuple[float, float]:
        tensors = read_gguf(path).tensors
        nbytes = sum(t.n_bytes for name, t in tensors.items() if name in linear)
        return nbytes * 8 / table.n_weights, llama_cpp.perplexity(llama, path, test_text, n_ctx)

    reference = llama_cpp.perplexity(llama, f32, test_text, n_ctx)
    rows = []
    for preset in PRESETS:
        out = folder / f"{preset}.gguf"
        extra = ["--token-embedding-type", "f32", *(["--imatrix", str(bank.imatrix)] if bank.imatrix else [])]
        llama_cpp.run([str(llama.tool("llama-quantize")), *extra, str(f32), str(out), preset, "2"], what="llama-quantize")
        bpw, ppl = score(out)
        rows.append((f"llama.cpp {preset}", bpw, ppl, None))
        print(f"{preset}: {bpw:.3f} bpw, perplexity {ppl:.4f}", flush=True)
    for bpw in (float(b) for b in args.budgets.split(",")):
        spec = base_spec.with_overrides(budget=f"{bpw}bpw", search={"trials": args.trials, "workers": args.workers, "seed": 0})
        name = f"gguf-{bpw}"
        start = time.perf_counter()
        Search(Workload(spec, device="cpu"), storage, study=name, progress=True).run()
        seconds = time.perf_counter() - start
        result = export_study(storage, name, folder / name)
        got_bpw, ppl = score(folder / name / "model.gguf")
        rows.append((f"mpsearch gguf search at {bpw} ({args.trials} trials)", got_bpw, ppl, seconds))
        print(f"{name}: {got_bpw:.3f} bpw, perplexity {ppl:.4f}; llama-perplexity vs mpsearch's (evaluation): {result.targets['gguf']['perplexity']}", flush=True)

    print(f"\nSmolLM2-135M-Instruct, {n} test paragraphs, llama-perplexity (n_ctx {n_ctx}); F32 GGUF {reference:.4f}"
          f"{', importance matrix from the calibration split' if args.imatrix else ''}\n")
    print("| file | bpw (linear) | perplexity | / F32 | search s |")
    print("|---|---|---|---|---|")
    for label, bpw, ppl, seconds in sorted(rows, key=lambda r: r[1]):
        print(f"| {label} | {bpw:.3f} | {ppl:.4f} | {ppl / reference:.4f} | {'' if seconds is None else f'{seconds:.0f}'} |")


if __name__ == "__main__":
    main()
