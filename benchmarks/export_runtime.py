"""What an export costs to hold and to run: the default study's best plan, loaded from its packed file.

Exports the best trial of the default study (``studies/minilm.toml``; its search runs first
if the study is not in ``--storage`` yet), loads it with ``mpsearch.load_quantized`` and
compares it with the FP32 model, in one process, at the same moment:

* memory: the bytes of every parameter and buffer the loaded model holds against the
  FP32 model's, for the whole model and for the quantizable layers alone;
* CPU forward latency: quantized / FP32, medians of ``--repeats`` runs taken in
  alternation, at batch 1 and at the study's evaluation batch, on the study's own
  sentences. Every forward of the loaded model decodes its packed weights; the time that
  takes is measured on its own too. The same export loaded with ``decode_cache=True``
  (each weight decoded once, then kept) is timed in the same alternation, with its memory.

    .venv/bin/python benchmarks/export_runtime.py [--storage sqlite:///mpsearch.db] [--study minilm-4bpw] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="sqlite:///mpsearch.db", help="where the default study is (or goes)")
    parser.add_argument("--study", default=None, help="default: the default study's name, minilm-4bpw")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from mpsearch.export import export_study, load_quantized, read_plan
    from mpsearch.export.evaluate import resident_bytes
    from mpsearch.quant.modules import QuantizedModule
    from mpsearch.search.driver import Search, default_study_name
    from mpsearch.spec import Spec
    from mpsearch.storage import Storage
    from mpsearch.storage.trials import study_names
    from mpsearch.workload import Workload

    torch.set_num_threads(args.threads)
    spec = Spec.load(STUDY)
    storage = Storage(args.storage)
    name = args.study or default_study_name(spec)
    workload = Workload(spec, device="cpu")
    if name not in study_names(storage):
        print(f"study {name} is not in {args.storage}: running the default search first")
        Search(workload, storage, study=name, progress=True).run()

    out = Path(tempfile.mkdtemp(prefix="mpsearch-export-bench-")) / "export"
    result = export_study(storage, name, out)
    print(f"exported trial {result.trial} of {name}: loss {result.loss:.6g} (loaded back: {result.verified_loss:.6g}), "
          f"{result.bytes:,} bytes, {result.bpw:.4f} bpw")

    fp = workload.build_model()
    quantized = load_quantized(out, workload.build_model())
    cached = load_quantized(out, workload.build_model(), decode_cache=True)
    table = workload.layer_table()
    fp_bytes, q_bytes = resident_bytes(fp), resident_bytes(quantized)
    fp_layers = sum(layer.n * 4 for layer in table.layers)
    q_layers = table.quantized_bytes(read_plan(out).plan)
    print(f"\nmemory: FP32 model {fp_bytes:,} B, loaded export {q_bytes:,} B: ratio {q_bytes / fp_bytes:.3f}")
    print(f"        quantizable layers alone: {fp_layers:,} B -> {q_layers:,} B: ratio {q_layers / fp_layers:.3f}")

    batches = workload.evaluation_batches()
    full = batches[0]
    single = {k: v[:1] for k, v in full.items()}
    modules = [m for m in quantized.modules() if isinstance(m, QuantizedModule)]
    print(f"\nCPU forward latency, {args.threads} threads, median of {args.repeats} (runs alternate):")
    with torch.inference_mode():
        for label, batch in ((f"batch 1 x {single['input_ids'].shape[1]} tokens", single), (f"batch {full['input_ids'].shape[0]} x {full['input_ids'].shape[1]} tokens", full)):
            for _ in range(2):  # warm up all three (the cached one decodes here)
                for model in (fp, quantized, cached):
                    workload.forward(model, batch)
            a, b, c = [], [], []
            for _ in range(args.repeats):
                a.append(ms(lambda: workload.forward(fp, batch)))
                b.append(ms(lambda: workload.forward(quantized, batch)))
                c.append(ms(lambda: workload.forward(cached, batch)))
            fa, qb, qc = statistics.median(a), statistics.median(b), statistics.median(c)
            print(f"  {label:28s} FP32 {fa:8.1f} ms   quantized {qb:8.1f} ms (ratio {qb / fa:.2f})   decode_cache {qc:8.1f} ms (ratio {qc / fa:.2f})")
        decode = statistics.median(ms(lambda: [m.matrix() for m in modules]) for _ in range(args.repeats))
        print(f"  decoding every packed weight once: {decode:.1f} ms ({len(modules)} layers)")
    held = resident_bytes(cached) + sum(m.__dict__["_decoded"].numel() * m.__dict__["_decoded"].element_size() for m in cached.modules() if "_decoded" in m.__dict__)
    print(f"\nwith decode_cache, after a forward: {held:,} B held, ratio {held / fp_bytes:.3f} of the FP32 model (packed buffers kept too)")



if __name__ == "__main__":
    main()
