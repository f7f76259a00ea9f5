"""What a trial pays to put a plan into the model: the candidate bank's delta swap.

The bank keeps packed codes only; applying a plan decodes, into the model's own weights, the
layers whose bits differ from what the model holds.

A: a whole new random plan applied and restored (every layer decoded);
A': a delta swap: the next plan differs from the last in 3 layers, as a search's steps mostly do;
B: one evaluation forward pass of MiniLM: one batch of the default study's evaluation set
   (32 sentences, up to 128 tokens), under ``torch.no_grad()``. The whole evaluation set, what a
   trial really scores, is timed too and reported alongside.

Everything runs in one process, interleaved, on the default study; the script prints medians and
the ratios. From the repository root:

    .venv/bin/python benchmarks/bank_swap.py [--repeats 21] [--method gptq] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mpsearch.spec import Spec
from mpsearch.workload import Workload

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.toml"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--method", default="gptq", choices=["rtn", "gptq"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    spec = Spec.load(STUDY)
    spec = spec.with_overrides(quant={**spec.quant.model_dump(), "method": args.method})
    w = Workload(spec, device=args.device)
    table = w.layer_table()
    with tempfile.TemporaryDirectory() as cache:
        build = timed(lambda: w.candidate_bank(cache_dir=cache))
        bank = w.candidate_bank(cache_dir=cache)
        again = Workload(spec, device=args.device)
        load = timed(lambda: again.candidate_bank(cache_dir=cache))

    model = w.build_model()
    batch = w.evaluation_batches()[0]
    w.loss(model)  # warm-up; fills the FP reference cache
    sync = torch.cuda.synchronize if w.device.type == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            w.forward(model, batch)
        sync()

    rng = random.Random(0)
    random_plan = lambda: {name: rng.choice(table.menu) for name in table.names}  # noqa: E731
    whole, delta, forwards, full = [], [], [], []
    current = random_plan()
    for _ in range(args.repeats):
        plan = random_plan()
        whole.append(timed(lambda: (bank.apply(model, plan), bank.restore(model), sync())))
        bank.apply(model, current)
        step = dict(current)
        for name in rng.sample(table.names, 3):
            step[name] = rng.choice([b for b in table.menu if b != step[name]])
        delta.append(timed(lambda: (bank.apply(model, step), sync())))
        current = step
        bank.restore(model)
        forwards.append(timed(forward))
        full.append(timed(lambda: w.loss(model)))

    a, d, b, f = (statistics.median(x) for x in (whole, delta, forwards, full))
    print(f"MiniLM, {len(table.layers)} layers, method {args.method}, device {args.device}, repeats {args.repeats}")
    print(f"bank build (all {len(table.menu)} bit-widths): {build:.1f} s; reloaded from its disk cache: {load:.2f} s")
    print(f"bank memory (packed codes only): {bank.memory()['total'] / 2**20:.1f} MiB")
    print(f"A  whole plan apply + restore : median {a * 1e3:8.2f} ms")
    print(f"A' delta swap (3 layers)      : median {d * 1e3:8.2f} ms")
    print(f"B  one eval batch forward     : median {b * 1e3:8.2f} ms  (batch of {batch['input_ids'].shape[0]})")
    print(f"   whole eval set loss        : median {f * 1e3:8.2f} ms  ({len(w.evaluation_batches())} batches)")
    print(f"ratio A'/B : {d / b:.2%}   A/B : {a / b:.2%}   A'/whole eval : {d / f:.2%}")


if __name__ == "__main__":
    main()
