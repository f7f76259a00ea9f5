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
    """Each layer's Fisher diagonal, in its weight's layout, for the calibration loss (Σ total / N).

    On the workload's own FP model (its weights are only read); each layer's gradient is squared
    into its sum and dropped as soon as the backward pass has it.
    """
    from tqdm.auto import tqdm

    model = workload.fp_model()
    table = workload.layer_table()
    modules = dict(model.named_modules())
    params = [modules[name].weight for name in table.names]
    generator = torch.Generator().manual_seed(seed)
    squares = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def consume(i: int):
        def hook(p: torch.Tensor) -> None:
            squares[i] += p.grad.float() ** 2
            p.grad = None

        return hook

    batches = workload.calibration_batches()
    references = workload.reference("calibration")
    count = 0.0
    bar = tqdm(total=samples * len(batches), desc="fisher", unit="batch", disable=not progress, leave=False)
    handles = []
    try:
        for p in params:
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(consume(len(handles))))
        for _ in range(samples):
            count = 0.0
            for batch, ref in zip(batches, references):
                with torch.enable_grad():
                    out = workload.forward(model, batch)
                    count += workload.loss_fn.count(out, ref, batch)  # the loss is Σ total / Σ count
                    workload.loss_fn.direction(out, batch, generator).backward(inputs=params)
                bar.update()
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
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
