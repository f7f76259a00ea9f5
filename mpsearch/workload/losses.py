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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

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


@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[[Outputs, Outputs | None, Batch], Terms]
    needs_reference: bool = True
    differentiable: bool = True

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


def _builtin(name: str, fn, needs_reference: bool = True, differentiable: bool = True):
    LOSSES.register(name)(lambda user=None: Loss(name, fn, needs_reference, differentiable))


_builtin("distill", distill_terms)
_builtin("kl", kl_terms)
_builtin("cosine", cosine_terms)
_builtin("mse", mse_terms)
_builtin("causal-lm", causal_lm_terms, needs_reference=False)
_builtin("error-rate", error_rate_terms, needs_reference=False, differentiable=False)


@LOSSES.register("callable")
def _user(user: Callable | None = None) -> Loss:
    if user is None:
        raise WorkloadError('loss.callable: kind = "callable" needs loss.callable = "module:function"')
    return Loss("callable", user)


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
