"""Fisher sensitivity, the cheap method: ``Σ F ⊙ (Q_b(W) − W)²`` per candidate.

``F`` is the diagonal of the Fisher (Gauss–Newton) matrix of the calibration loss at the FP
weights, estimated from gradients only: no second derivatives.

The plain "squared gradients of the loss" would be zero here, since a self-distillation loss at
the FP weights has zero gradient. Instead each batch draws a random output direction ``u``
whose covariance is the loss's own Hessian with respect to the model's output (the loss's
:attr:`~mpsearch.workload.losses.Loss.direction`), and backpropagates ``⟨u, output⟩``: the
gradient ``g = Jᵀu`` then satisfies ``E[g gᵀ] = Jᵀ H_out J``, the Gauss–Newton matrix, so
``E[g²]`` is its diagonal. Sums over examples need no per-example gradients: the cross terms
between independent directions vanish in expectation.
"""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.quant.apply import module_layout
from mpsearch.sensitivity.profile import SENSITIVITY, Method, Options


def fisher_diagonal(workload, samples: int = 4, seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Each layer's Fisher diagonal, in its weight's layout, for the calibration loss (Σ total / N)."""
    from tqdm.auto import tqdm

    model = workload.build_model()
    model.requires_grad_(False)
    table = workload.layer_table()
    modules = dict(model.named_modules())
    params = [modules[name].weight for name in table.names]
    for p in params:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    squares = [torch.zeros_like(p) for p in params]
    batches = workload.calibration_batches()
    references = workload.reference("calibration")
    count = 0.0
    bar = tqdm(total=samples * len(batches), desc="fisher", unit="batch", disable=not progress, leave=False)
    for _ in range(samples):
        count = 0.0
        for batch, ref in zip(batches, references):
            out = workload.forward(model, batch)
            _total, n = workload.loss_fn(out, ref, batch)  # for its count: the loss is Σ total / Σ count
            count += float(n)
            scalar = workload.loss_fn.direction(out, batch, generator)
            grads = torch.autograd.grad(scalar, params, allow_unused=True)
            for sq, g in zip(squares, grads):
                if g is not None:
                    sq += g.detach() ** 2
            bar.update()
    bar.close()
    return {name: sq / (samples * count) for name, sq in zip(table.names, squares)}


def fisher_scores(fisher: dict[str, torch.Tensor], bank, model: nn.Module) -> dict[str, dict[int, float]]:
    """``Σ F ⊙ (Q_b(W) − W)²`` for every candidate of the bank."""
    modules = dict(model.named_modules())
    scores: dict[str, dict[int, float]] = {}
    for layer in bank.table.layers:
        module = modules[layer.name]
        w = module.weight.detach().float()
        f = fisher[layer.name].float()
        scores[layer.name] = {}
        for bits in bank.bits:
            w_hat = module_layout(module, bank.candidate(layer.name, bits).dequantized(layer)).float()
            scores[layer.name][bits] = float((f * (w_hat - w) ** 2).sum())
    return scores


def _rows(workload, params: dict, options: Options, pool, progress: bool) -> list[dict]:
    fisher = fisher_diagonal(workload, samples=params["samples"], seed=params["seed"], progress=progress)
    scores = fisher_scores(fisher, workload.candidate_bank(progress=progress), workload.fp_model())
    return [
        {"name": layer.name, "n": layer.n, "trace": float(fisher[layer.name].sum()), "score": {str(b): v for b, v in scores[layer.name].items()}}
        for layer in workload.layer_table().layers
    ]


SENSITIVITY.register("fisher")(
    Method(label="Σ F (Q(W) − W)²", params=lambda workload, options: {"samples": options.fisher_samples, "seed": options.seed}, compute=_rows)
)
