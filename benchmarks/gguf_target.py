"""The gguf target against llama.cpp's own presets, measured in llama.cpp itself.

The default study (``studies/minilm.toml``) is searched with ``[target] format = "gguf"`` at each
budget (default 4.5 and 5.0 bits per linear weight, in llama.cpp's real bytes) and exported to a
GGUF. llama.cpp's presets are made from the same F32 GGUF with ``llama-quantize``, once as they
come and once with the token embeddings kept at F32 (as the export keeps them), so that only the
linear layers differ. Every file is scored the same way: ``llama-embedding`` on the study's
evaluation texts, cosine of each embedding to the F32 GGUF's, mean over the texts.
``bpw`` is the bytes of the 36 linear weight tensors × 8 / their weights, for every row alike.

    .venv/bin/python benchmarks/gguf_target.py [--budgets 4.5,5.0] [--trials 64] [--workers 2]

Needs ``mpsearch toolchain llama.cpp``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"
PRESETS = ("IQ4_NL", "Q4_0", "Q4_K_S", "Q5_0", "Q4_K_M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4.5,5.0", help="bits per linear weight, comma-separated")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sampler", default=None, help="default: the study's")
    args = parser.parse_args()

    import numpy as np

    from mpsearch.export import export_study
    from mpsearch.quant import llama_cpp
    from mpsearch.quant.gguf import GGUF_LEVELS, gguf_tensor
    from mpsearch.quant.gguf_file import read_gguf
    from mpsearch.search.driver import Search
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage
    from mpsearch.workload import Workload
    from mpsearch.workload.data import split
    from mpsearch.workload.models import minilm_dir

    llama = llama_cpp.tools()
    folder = Path(tempfile.mkdtemp(prefix="mpsearch-gguf-bench-"))
    storage = Storage(f"sqlite:///{folder / 'mpsearch.db'}")
    study = Spec.load(STUDY)
    base_spec = study.with_overrides(target={"format": "gguf"}, quant={**study.quant.model_dump(mode="json"), "bits": list(GGUF_LEVELS)})
    texts = [t for t in split(base_spec.data, base_spec.resolve)[1].texts if "\n" not in t]
    table = Workload(base_spec, device="cpu").layer_table()
    linear = {f"{gguf_tensor(layer.name)}.weight" for layer in table.layers}
    f32 = llama.convert(minilm_dir(), folder / "minilm-f32.gguf", "f32")
    reference = llama_cpp.embed(llama, f32, texts)

    def score(path: Path) -> tuple[float, float]:
        tensors = read_gguf(path).tensors
        nbytes = sum(t.n_bytes for name, t in tensors.items() if name in linear)
        vectors = llama_cpp.embed(llama, path, texts)
        cos = np.sum(vectors * reference, axis=1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
        return nbytes * 8 / table.n_weights, float(statistics.fmean(cos))

    rows = []
    for preset in PRESETS:
        for label, extra in (("", []), (", token_embd F32", ["--token-embedding-type", "f32"])):
            out = folder / f"{preset}{'-f32emb' if extra else ''}.gguf"
            llama_cpp.run([str(llama.tool("llama-quantize")), *extra, str(f32), str(out), preset, "2"], what="llama-quantize")
            bpw, cos = score(out)
            rows.append((f"llama.cpp {preset}{label}", bpw, cos, None))
    for bpw in (float(b) for b in args.budgets.split(",")):
        search = {"trials": args.trials, "workers": args.workers, **({"sampler": args.sampler} if args.sampler else {})}
        spec = base_spec.with_overrides(budget=f"{bpw}bpw", search=search)
        name = f"gguf-{bpw}"
        start = time.perf_counter()
        Search(Workload(spec, device="cpu"), storage, study=name, progress=True).run()
        seconds = time.perf_counter() - start
        result = export_study(storage, name, folder / name)
        got_bpw, cos = score(folder / name / "model.gguf")
        rows.append((f"mpsearch gguf search at {bpw} ({args.trials} trials)", got_bpw, cos, seconds))
        print(f"{name}: llama-embedding vs mpsearch's evaluation, mean cosine {result.targets['gguf']['embedding']['mean']:.6f}", flush=True)

    print(f"\nMiniLM, {len(texts)} evaluation texts, cosine to the F32 GGUF in llama.cpp (mean over texts)\n")
    print("| file | bpw (linear) | cosine | search s |")
    print("|---|---|---|---|")
    for label, bpw, cos, seconds in sorted(rows, key=lambda r: r[1]):
        print(f"| {label} | {bpw:.3f} | {cos:.5f} | {'' if seconds is None else f'{seconds:.0f}'} |")


if __name__ == "__main__":
    main()
