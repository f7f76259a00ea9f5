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

from mpsearch.errors import MPSearchError, WorkloadError, first_line
from mpsearch.registry import Registry

Batch = dict[str, torch.Tensor]
Terms = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TopK:
    """A distribution over a vocabulary kept in bounded memory: the ``k`` likeliest entries'
    log-probabilities and indices, the log of the mass all the others share, and ``k`` entries
    drawn from those others in proportion to their probability (with their log-probabilities).

    The drawn entries let :func:`kl_terms` estimate the tail's part of a KL without bias (see
    there); without them the tail is one bucket, a lower bound that on SmolLM2 missed 5–10 % of
    the KL at k = 256. The draw is fixed by ``generator``, so every plan is scored against the
    same entries.

    >>> top = TopK.of(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), k=2)
    >>> top.index.tolist(), round(float(top.rest.exp()), 4), set(top.sample_index.flatten().tolist()) <= {2, 3}
    ([[0, 1]], 0.1192, True)
    """

    logprobs: torch.Tensor  # (..., k) float32
    index: torch.Tensor  # (..., k) int32 (a vocabulary fits; half of int64's memory)
    rest: torch.Tensor  # (...) float32: log(1 − Σ exp(logprobs))
    sample_logprobs: torch.Tensor | None = None  # (..., k) float32: drawn from the rest
    sample_index: torch.Tensor | None = None  # (..., k) int32

    @classmethod
    def of(cls, logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> "TopK":
        logp = F.log_softmax(logits.detach().float(), dim=-1)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        rest = log1mexp(torch.logsumexp(top.values, dim=-1))
        if top.indices.shape[-1] == logp.shape[-1]:  # nothing left over to draw from
            return cls(top.values, top.indices.int(), rest)
        weights = logp.exp().scatter_(-1, top.indices, 0.0)
        weights += (weights.sum(-1, keepdim=True) <= 0) * 1.0  # a row with no mass left: any entry (its weight is 0)
        weights.scatter_(-1, top.indices, 0.0)
        flat = weights.reshape(-1, weights.shape[-1])
        drawn = torch.multinomial(flat, top.indices.shape[-1], replacement=True, generator=generator).reshape(top.indices.shape)
        return cls(top.values, top.indices.int(), rest, logp.gather(-1, drawn), drawn.int())

    def map(self, fn) -> "TopK":
        sampled = (None, None) if self.sample_index is None else (fn(self.sample_logprobs), fn(self.sample_index))
        return TopK(fn(self.logprobs), fn(self.index), fn(self.rest), *sampled)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, floored at the smallest positive float32 (never −inf)."""
    return torch.log((-torch.expm1(x.clamp(max=0))).clamp_min(torch.finfo(torch.float32).tiny))


@dataclass
class Outputs:
    """A model's output reduced to the one tensor losses look at, and what it is.

    A reference may keep logits as :class:`TopK` instead (``value`` is then None): a causal LM's
    full logits are examples × tokens × vocabulary floats.
    """

    value: torch.Tensor | None
    kind: Literal["logits", "hidden", "tensor"]
    topk: TopK | None = None

    def map(self, fn) -> "Outputs":
        """The same outputs with ``fn`` applied to every tensor (``.cpu()``, a slice of examples)."""
        return Outputs(None if self.value is None else fn(self.value), self.kind, None if self.topk is None else self.topk.map(fn))

    def kept(self, top_k: int, generator: torch.Generator | None = None) -> "Outputs":
        """What a reference keeps: logits as their top ``top_k`` and ``top_k`` draws from the rest
        (0: all of them); anything else as it is."""
        if self.kind != "logits" or top_k <= 0 or self.value.shape[-1] <= top_k:
            return self
        return Outputs(None, "logits", TopK.of(self.value, top_k, generator))

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


def position_count(out: Outputs, batch: Batch) -> float:
    """Positions a per-position loss averages over: the unmasked tokens, else every position."""
    value = out.value
    per_position = value.shape[:-1] if value.dim() > 1 else value.shape
    mask = _token_mask(value, batch)
    return float(mask.sum()) if mask is not None else float(math.prod(per_position))


def example_count(out: Outputs, batch: Batch) -> float:
    return float(out.value.shape[0])


def causal_lm_count(out: Outputs, batch: Batch) -> float:
    mask = batch.get("attention_mask")
    return float(mask[:, 1:].sum()) if mask is not None else float(out.value.shape[0] * (out.value.shape[1] - 1))


def distill_count(out: Outputs, batch: Batch) -> float:
    return example_count(out, batch) if out.kind == "hidden" else position_count(out, batch)


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
    reads_top_k: bool = False  # its reference logits may be kept as TopK (the KL losses)
    counts: Callable[[Outputs, Batch], float] | None = None  # the batch's count alone, without computing the loss

    def __call__(self, out: Outputs, ref: Outputs | None, batch: Batch) -> Terms:
        return self.fn(out, ref, batch)

    def count(self, out: Outputs, ref: Outputs | None, batch: Batch) -> float:
        """What a batch counts for in ``Σ total / Σ count`` (tokens or examples)."""
        if self.counts is not None:
            return self.counts(out, batch)
        with torch.no_grad():
            return float(self.fn(out, ref, batch)[1])


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
    """KL(p_ref ‖ q) per position.

    Against a :class:`TopK` reference, the k likeliest tokens' part is exact and the rest's part,
    Σ_rest p_i log(p_i/q_i) = p_rest · E_{i∼p_rest}[log(p_i/q_i)], is estimated from the k tokens
    drawn from the rest: their mean of log(p/q), less β times the mean of the control variate
    q_i/p_i − q_rest/p_rest (whose expectation is exactly 0: both masses are known), with β fitted
    over the batch's positions. Unbiased up to β; on SmolLM2 (k = 256) within 0.3 % of the full KL
    from uniform 2 to 8 bits (benchmarks/topk_error.py). A reference without draws gets the one-bucket lower bound.
    """
    log_q = F.log_softmax(out.value.float(), dim=-1)
    if ref.topk is None:
        log_p = F.log_softmax(ref.value.float(), dim=-1)
        return _masked_terms((log_p.exp() * (log_p - log_q)).sum(-1), batch, out.value)
    top = ref.topk
    device = log_q.device
    p_top, q_top = top.logprobs.to(device), log_q.gather(-1, top.index.to(device).long())
    p_rest = top.rest.to(device)
    q_rest = log1mexp(torch.logsumexp(q_top, dim=-1))
    per_position = (p_top.exp() * (p_top - q_top)).sum(-1)
    if top.sample_index is None:
        return _masked_terms(per_position + p_rest.exp() * (p_rest - q_rest), batch, out.value)
    log_ratio = top.sample_logprobs.to(device) - log_q.gather(-1, top.sample_index.to(device).long())  # log(p/q) per draw
    control = (-log_ratio).exp() - (q_rest - p_rest).exp()[..., None]
    beta = _pooled_slope(log_ratio.detach(), control.detach(), p_rest.exp().detach(), _token_mask(out.value, batch))
    return _masked_terms(per_position + p_rest.exp() * (log_ratio.mean(-1) - beta * control.mean(-1)), batch, out.value)


def _pooled_slope(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The least-squares slope of ``y`` on ``x`` (each (..., draws)), from the deviations within each
    position, weighted by ``weight``² and pooled over the (masked) positions."""
    dy, dx = y - y.mean(-1, keepdim=True), x - x.mean(-1, keepdim=True)
    w = (weight * weight if mask is None else weight * weight * mask)[..., None]
    return (w * dy * dx).sum() / (w * dx * dx).sum().clamp_min(torch.finfo(torch.float32).tiny)


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


def _builtin(name: str, fn, direction: Direction, counts, *, needs_reference: bool = True, differentiable: bool = True, zero_residual: bool = True, reads_top_k: bool = False):
    LOSSES.register(name)(lambda user=None: Loss(name, fn, needs_reference, differentiable, direction, zero_residual, reads_top_k, counts))


_builtin("distill", distill_terms, distill_direction, distill_count, reads_top_k=True)
_builtin("kl", kl_terms, kl_direction, position_count, reads_top_k=True)
_builtin("cosine", cosine_terms, cosine_direction, example_count)
_builtin("mse", mse_terms, mse_direction, position_count)
_builtin("causal-lm", causal_lm_terms, causal_lm_direction, causal_lm_count, needs_reference=False, zero_residual=False)
_builtin("error-rate", error_rate_terms, kl_direction, None, needs_reference=False, differentiable=False, zero_residual=False)


@LOSSES.register("callable")
def _user(user: Callable | None = None) -> Loss:
    if user is None:
        raise WorkloadError('loss.callable: kind = "callable" needs loss.callable = "module:function"')
    return Loss("callable", _guarded(user))


def _guarded(user: Callable) -> Callable:
    """The user's loss, with anything it raises turned into one line that names it."""
    name = f"{getattr(user, '__module__', '?')}.{getattr(user, '__qualname__', repr(user))}"

    def call(out: Outputs, ref: Outputs | None, batch: Batch) -> Terms:
        try:
            terms = user(out, ref, batch)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: any error is theirs to fix
            raise WorkloadError(f"loss.callable: {name}(output, reference, batch) raised {type(e).__name__}: {first_line(e)}; fix the function") from None
        if not (isinstance(terms, tuple) and len(terms) == 2):
            raise WorkloadError(f"loss.callable: {name} returned {type(terms).__name__}; it must return (total, count)")
        return terms

    return call


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
