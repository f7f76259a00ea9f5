"""Fisher sensitivity, the cheap method: ``Σ F ⊙ (Q_b(W) − W)²`` per candidate.

``F`` is the diagonal of the Fisher (Gauss–Newton) matrix of the calibration loss at the FP
weights, estimated from gradients only: no second derivatives.

The plain "squared gradients of the loss" would be zero here, since a self-distillation
loss at the FP weights has zero gradient. Instead each batch draws a random output
direction ``u`` whose covariance is the loss's own Hessian with respect to the model's
output, and backpropagates ``⟨u, output⟩``: the gradient ``g = Jᵀu`` then satisfies
``E[g gᵀ] = Jᵀ H_out J``, the Gauss–Newton matrix, so ``E[g²]`` is its diagonal. Per loss:

Every ``u`` is ``A ε`` with ``AAᵀ = H_out`` and ``ε`` Rademacher (±1): any zero-mean,
identity-covariance ``ε`` would do, and Rademacher's has the least variance for traces
(Hutchinson's choice). Per loss:

* KL / cross-entropy over logits (``kl``, ``causal-lm``, ``error-rate``): ``H_out = diag(p) − ppᵀ``
  with ``p = softmax(logits)``, the Hessian of cross-entropy in the logits, and
  ``A = diag(√p) − p√pᵀ`` (so ``u = √p ⊙ ε − p ⟨√p, ε⟩``; for ``causal-lm`` this is the true
  Fisher);
* ``cosine`` (1 − cos of mean-pooled embeddings ``e``): ``u = (I − êêᵀ) ε / ‖e‖``, whose
  covariance is the Hessian of 1 − cos at ``e = e_ref``;
* ``mse`` (mean over ``d`` features): ``u = √(2/d) ε``;
* a user ``callable``: ``u = ε`` (the loss's curvature is unknown; treated as isotropic).

Sums over examples need no per-example gradients: the cross terms between independent
directions vanish in expectation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpsearch.quant.apply import module_layout
from mpsearch.workload.losses import Outputs, _token_mask, mean_pool


def output_direction(kind: str, out: Outputs, batch, generator: torch.Generator) -> torch.Tensor:
    """The scalar ``⟨u, output⟩`` whose gradient is ``Jᵀu`` (see the module docstring)."""
    value = out.value
    if kind == "distill":
        kind = {"logits": "kl", "hidden": "cosine", "tensor": "mse"}[out.kind]
    if kind in ("kl", "causal-lm", "error-rate"):
        logits = value[:, :-1] if kind == "causal-lm" else value
        mask = batch.get("attention_mask")
        if kind == "causal-lm":
            mask = None if mask is None else mask[:, 1:]
        elif logits.dim() == 3:
            mask = _token_mask(logits, batch)
        else:
            mask = None
        p = torch.softmax(logits.detach().float(), dim=-1)
        root = p.sqrt()
        eps = _rademacher(p, generator)
        u = root * eps - p * (root * eps).sum(-1, keepdim=True)
        if mask is not None:
            u = u * mask.to(u.device, u.dtype)[..., None]
        return (u * logits.float()).sum()
    if kind == "cosine":
        e = mean_pool(value, batch).flatten(1).float()
        norm = e.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = e.detach() / norm
        eps = _rademacher(e, generator)
        u = (eps - unit * (unit * eps).sum(-1, keepdim=True)) / norm
        return (u * e).sum()
    if kind == "mse":
        v = value.float()
        d = v.shape[-1] if v.dim() > 1 else 1
        u = _rademacher(v, generator) * math.sqrt(2 / d)
        mask = _token_mask(v, batch) if v.dim() == 3 else None
        if mask is not None:
            u = u * mask.to(u.device, u.dtype)[..., None]
        return (u * v).sum()
    return (_rademacher(value.float(), generator) * value.float()).sum()


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 2, like.shape, generator=generator)
    return (bits * 2 - 1).to(like.device, like.dtype)


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
    kind = workload.spec.loss.kind
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
            scalar = output_direction(kind, out, batch, generator)
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
