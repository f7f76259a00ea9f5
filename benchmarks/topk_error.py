"""How far the bounded LM reference's KL is from the full KL, on SmolLM2.

The reference keeps each position's top k log-probabilities, the rest's mass and k tokens drawn
from the rest (``mpsearch.workload.losses.TopK``). For uniform plans at each bit-width, in one run:
the full KL (every logit kept), the estimate from the bounded reference, and the one-bucket lower
bound the reference gives without its draws; relative errors against the full KL. Target < 1 %.

    .venv/bin/python benchmarks/topk_error.py [--examples 32] [--tokens 128] [--k 64]

Quantization is rtn (the error is the reference's, not the quantizer's); SmolLM2 on 2 CPU cores,
about 3 minutes at the defaults.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mpsearch.spec import Spec
from mpsearch.workload import Workload
from mpsearch.workload.losses import kl_terms

STUDY = Path(__file__).resolve().parent.parent / "studies" / "smollm2.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    text = STUDY.read_text()
    for line, new in (("evaluation = 128", f"evaluation = {args.examples}"), ("calibration = 128", "calibration = 4"),
                      ("max_length = 128", f"max_length = {args.tokens}"), ('method = "gptq"', 'method = "rtn"'),
                      ("bits = [2, 3, 4, 8, 16]", "bits = [2, 3, 4, 8]")):
        text = text.replace(line, new)
    folder = Path(tempfile.mkdtemp(prefix="mpsearch-topk-"))
    (folder / "s.toml").write_text(text + f'\n[storage]\nurl = "sqlite:///{folder / "m.db"}"\n')
    lm = Workload(Spec.load(folder / "s.toml"), device="cpu")
    fp, bank, table = lm.fp_model(), lm.candidate_bank(cache_dir=None), lm.layer_table()
    batches = lm.evaluation_batches()
    with torch.no_grad():
        refs = [lm.forward(fp, b) for b in batches]
        print(f"SmolLM2, {args.examples} paragraphs × ≤{args.tokens} tokens, k = {args.k}; relative error of the KL against the full KL")
        worst = 0.0
        for bits in table.menu:
            model = lm.build_model()
            bank.apply(model, table.uniform(bits))
            outs = [lm.forward(model, b) for b in batches]
            full = sum(float(kl_terms(o, r, b)[0]) for o, r, b in zip(outs, refs, batches))
            errors, bound = [], None
            for seed in range(args.seeds):
                draws = torch.Generator().manual_seed(seed)
                kept = [r.kept(args.k, draws) for r in refs]
                errors.append(sum(float(kl_terms(o, r, b)[0]) for o, r, b in zip(outs, kept, batches)) / full - 1)
                if bound is None:
                    for r in kept:
                        r.topk.sample_index = None
                    bound = sum(float(kl_terms(o, r, b)[0]) for o, r, b in zip(outs, kept, batches)) / full - 1
            worst = max(worst, max(abs(e) for e in errors))
            print(f"  {bits}-bit: full KL {full:.4g}; top-k + draws {', '.join(f'{e:+.2%}' for e in errors)} (seeds); one-bucket bound {bound:+.2%}")
        print(f"worst |error| with draws: {worst:.2%} (target < 1 %)")


if __name__ == "__main__":
    main()
