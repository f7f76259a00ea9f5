"""Losses: a scalar per evaluation set, lower is better.

A loss returns a ``(total, count)`` pair for one batch, so the set's loss is
``Σ total / Σ count`` whatever the batch sizes (tokens for sequence losses, examples
otherwise). Distillation losses compare against the FP model's own outputs on the
same batch, computed once by the workload.

* ``distill`` — the default: ``kl`` when the model gives logits, ``cosine`` when it
  gives hidden states (sentence embeddings), ``mse`` otherwise;
* ``kl`` — KL(p_fp ‖ p_q) over the softmax of the logits, per token;
* ``cosine`` — 1 − cos of mean-pooled embeddings (attention mask respected), per example;
* ``mse`` — mean squared error of the outputs, per token or example;
* ``causal-lm`` — next-token cross-entropy on the batch's own tokens;
* ``error-rate`` — classification error against labels (not differentiable);
* ``callable`` — ``fn(output, reference, batch) -> (total, count)`` from ``loss.callable``.

Each loss also knows its curvature in the model's output: :attr:`Loss.direction` draws a random
output direction ``u = A ε`` with ``AAᵀ = H_out`` (the loss's Hessian with respect to the output)
and ``ε`` Rademacher, and returns ``⟨u, output⟩``. Backpropagating that scalar gives ``Jᵀu``, whose
covariance is the Gauss–Newton matrix ``Jᵀ H_out J``: the Fisher diagonal and the Gauss–Newton
Hessian traces of :mod:`mpsearch.sensitivity` are built on it. Per loss:

* KL / cross-entropy over logits (``kl``, ``causal-lm``, ``error-rate``): ``H_out = diag(p) − ppᵀ``
  with ``p = softmax(logits)``, and ``u = √p ⊙ ε − p ⟨√p, ε⟩`` (for ``causal-lm`` this is the true
  Fisher);
* ``cosine`` (1 − cos of mean-pooled embeddings ``e``): ``u = (I − êêᵀ) ε / ‖e‖``, whose covariance
  is the Hessian of 1 − cos at ``e = e_ref``;
* ``mse`` (mean over ``d`` features): ``u = √(2/d) ε``;
* a user ``callable``: ``u = ε`` (its curvature is unknown; treated as isotropic).

``zero_residual`` says the loss is a self-distillation loss: at the FP weights it is at its
minimum with zero residual, so its Hessian *is* the Gauss–Newton matrix; for a label loss
(``causal-lm``) the Gauss–Newton matrix is the Fisher, a positive semi-definite stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import math

import torch
import torch.nn.functional as F

from mpsearch.errors import MPSearchError, WorkloadError
from mpsearch.registry import Registry

Batch = dict[str, torch.Tensor]
Terms = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Outputs:
    """A model's output reduced to the one tensor losses look at, and what it is."""

    value: torch.Tensor
    kind: Literal["logits", "hidden", "tensor"]

    @classmethod
    def of(cls, raw: Any) -> "Outputs":
        """Read transformers' ModelOutput, a dict, a tuple or a plain tensor.

        >>> Outputs.of({"logits": torch.zeros(2, 3)}).kind
        'logits'
        """
        if isinstance(raw, torch.Tensor):
            return cls(raw, "tensor")
        if hasattr(raw, "keys"):
            if raw.get("logits") is not None:
                return cls(raw["logits"], "logits")
            if raw.get("last_hidden_state") is not None:
                return cls(raw["last_hidden_state"], "hidden")
            raw = list(raw.values())
        if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
            return cls(raw[0], "tensor")
        raise WorkloadError(f"the model returned {type(raw).__name__}; a loss needs a tensor, a tuple or a ModelOutput")


Direction = Callable[[Outputs, Batch, torch.Generator], torch.Tensor]


def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±1 entries shaped like ``like``, on its device and dtype, drawn from the CPU ``generator``
    (so a seed gives the same draws on every device)."""
    bits = torch.randint(0, 2, like.shape, generator=generator, device="cpu")
    return (bits * 2 - 1).to(like.dtype).to(like.device)


def logits_direction(logits: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    p = torch.softmax(logits.detach().float(), dim=-1)
    root = p.sqrt()
    eps = rademacher(p, generator)
    u = root * eps - p * (root * eps).sum(-1, keepdim=True)
    if mask is not None:
        u = u * mask.to(u.device, u.dtype)[..., None]
    return (u * logits.float()).sum()


def kl_direction(out: Outputs, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    return logits_direction(out.value, _token_mask(out.value, batch) if out.value.dim() == 3 else None, generator)


def causal_lm_direction(out: Outputs, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return logits_direction(out.value[:, :-1], None if mask is None else mask[:, 1:], generator)


def cosine_direction(out: Outputs, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    e = mean_pool(out.value, batch).flatten(1).float()
    norm = e.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit = e.detach() / norm
    eps = rademacher(e, generator)
    u = (eps - unit * (unit * eps).sum(-1, keepdim=True)) / norm
    return (u * e).sum()


def mse_direction(out: Outputs, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    v = out.value.float()
    d = v.shape[-1] if v.dim() > 1 else 1
    u = rademacher(v, generator) * math.sqrt(2 / d)
    mask = _token_mask(v, batch) if v.dim() == 3 else None
    if mask is not None:
        u = u * mask.to(u.device, u.dtype)[..., None]
    return (u * v).sum()


def isotropic_direction(out: Outputs, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    v = out.value.float()
    return (rademacher(v, generator) * v).sum()


def distill_direction(out: Outputs, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    pick = {"logits": kl_direction, "hidden": cosine_direction, "tensor": mse_direction}[out.kind]
    return pick(out, batch, generator)


@dataclass(frozen=True)
class Loss:
    """A loss: ``fn`` gives a batch's ``(total, count)``; ``direction`` its output curvature (see the module docstring)."""

    name: str
    fn: Callable[[Outputs, Outputs | None, Batch], Terms]
    needs_reference: bool = True
    differentiable: bool = True
    direction: Direction = isotropic_direction
    zero_residual: bool = False

    def __call__(self, out: Outputs, ref: Outputs | None, batch: Batch) -> Terms:
        return self.fn(out, ref, batch)


LOSSES: Registry[Callable[[], Loss]] = Registry("loss")


def _token_mask(value: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """The attention mask when ``value`` is (batch, tokens, features) over the batch's tokens."""
    mask = batch.get("attention_mask")
    if mask is not None and value.dim() == 3 and tuple(mask.shape) == tuple(value.shape[:2]):
        return mask.to(value.device, torch.float32)
    return None


def _masked_terms(per_position: torch.Tensor, batch: Batch, value: torch.Tensor) -> Terms:
    mask = _token_mask(value, batch)
    if mask is None:
        return per_position.sum(), torch.tensor(float(per_position.numel()), device=per_position.device)
    return (per_position * mask).sum(), mask.sum()


def kl_terms(out: Outputs, ref: Outputs, batch: Batch) -> Terms:
    log_q = F.log_softmax(out.value.float(), dim=-1)
    log_p = F.log_softmax(ref.value.float(), dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _masked_terms(per_position, batch, out.value)


def mean_pool(value: torch.Tensor, batch: Batch) -> torch.Tensor:
    mask = _token_mask(value, batch)
    if value.dim() == 2:
        return value.float()
    if mask is None:
        return value.float().mean(dim=1)
    return (value.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def cosine_terms(out: Outputs, ref: Outputs, batch: Batch) -> Terms:
    a, b = mean_pool(out.value, batch), mean_pool(ref.value, batch)
    per_example = 1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)
    return per_example.sum(), torch.tensor(float(per_example.numel()), device=a.device)


def mse_terms(out: Outputs, ref: Outputs, batch: Batch) -> Terms:
    diff = (out.value.float() - ref.value.float()) ** 2
    per_position = diff.mean(-1) if diff.dim() > 1 else diff
    return _masked_terms(per_position, batch, out.value)


def causal_lm_terms(out: Outputs, ref: Outputs | None, batch: Batch) -> Terms:
    ids = batch.get("input_ids")
    if ids is None or out.value.dim() != 3:
        raise WorkloadError("loss.kind: causal-lm needs token logits and input_ids in the data")
    logits, targets = out.value[:, :-1].float(), ids[:, 1:].to(out.value.device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(targets, dtype=torch.float32) if mask is None else mask[:, 1:].to(out.value.device, torch.float32)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum(), mask.sum()


def error_rate_terms(out: Outputs, ref: Outputs | None, batch: Batch) -> Terms:
    labels = batch.get("labels")
    if labels is None:
        raise WorkloadError(
            "loss.kind: error-rate needs labels; add data.label_field to the JSONL records or a 'labels' tensor"
        )
    predicted = out.value.argmax(dim=-1)
    labels = labels.to(predicted.device)
    return (predicted != labels).sum().float(), torch.tensor(float(labels.numel()), device=predicted.device)


def distill_terms(out: Outputs, ref: Outputs, batch: Batch) -> Terms:
    pick = {"logits": kl_terms, "hidden": cosine_terms, "tensor": mse_terms}[out.kind]
    return pick(out, ref, batch)


def _builtin(name: str, fn, direction: Direction, *, needs_reference: bool = True, differentiable: bool = True, zero_residual: bool = True):
    LOSSES.register(name)(lambda user=None: Loss(name, fn, needs_reference, differentiable, direction, zero_residual))


_builtin("distill", distill_terms, distill_direction)
_builtin("kl", kl_terms, kl_direction)
_builtin("cosine", cosine_terms, cosine_direction)
_builtin("mse", mse_terms, mse_direction)
_builtin("causal-lm", causal_lm_terms, causal_lm_direction, needs_reference=False, zero_residual=False)
_builtin("error-rate", error_rate_terms, kl_direction, needs_reference=False, differentiable=False, zero_residual=False)


@LOSSES.register("callable")
def _user(user: Callable | None = None) -> Loss:
    if user is None:
        raise WorkloadError('loss.callable: kind = "callable" needs loss.callable = "module:function"')
    return Loss("callable", user)


def is_zero_residual(kind: str) -> bool:
    """Whether loss ``kind`` is a self-distillation loss (its Hessian at the FP weights is Gauss–Newton).

    >>> is_zero_residual("distill"), is_zero_residual("causal-lm"), is_zero_residual("callable")
    (True, False, False)
    """
    return kind != "callable" and make_loss(kind).zero_residual


def make_loss(kind: str, user_callable: Callable | None = None) -> Loss:
    """The loss named by ``loss.kind``; ``callable`` wraps the user's function.

    >>> make_loss("distill").needs_reference
    True
    """
    try:
        factory = LOSSES.get(kind)
    except MPSearchError as e:
        raise WorkloadError(f"loss.kind: {e}") from None
    return factory(user_callable)
