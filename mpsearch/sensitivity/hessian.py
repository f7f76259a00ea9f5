"""Per-layer Hessian traces by Hutchinson's estimator (HAWQ-V2), and HAWQ's scores.

For a layer with weights ``w_l`` and the Hessian ``H`` of the workload's loss over the
calibration set, taken at the FP weights, ``Tr(H_ll) = E[v_lᵀ H_ll v_l]`` for Rademacher
``v_l`` (entries ±1). Two ways to get every layer's trace:

* **all at once** (the default): draw ``v`` over every layer together, form one
  Hessian-vector product ``Hv``, and read each layer's estimate as ``v_lᵀ (Hv)_l``. That
  adds ``Σ_{m≠l} v_lᵀ H_lm v_m``, which is zero in expectation since ``v_l`` and ``v_m``
  are independent: one product per probe serves every layer.
* **per layer**: ``v`` is zero outside layer ``l``; one product per layer per probe.

The all-at-once estimate is unbiased, but the cross-layer terms are noise: on MiniLM a small
attention projection's ``v_lᵀ(Hv)_l`` is dominated by its coupling to the other 36 layers,
and the stopping rule below needs hundreds of probes for it. Where the loss is a
self-distillation loss at the FP weights, the residual is zero and ``H = Jᵀ H_out J``
exactly (``J`` the Jacobian of the model's output, ``H_out`` the loss's Hessian in the
output), so there is a second estimator with no cross-layer terms at all:

* **gn** (the default for those losses): ``Tr(H_ll) = Tr(S J_l J_lᵀ S)`` with ``SSᵀ = H_out``
  is Hutchinson's estimator in the *output* space: draw ``u`` with covariance ``H_out`` (the
  loss's :attr:`~mpsearch.workload.losses.Loss.direction`), backpropagate ``⟨u, output⟩`` once,
  and ``‖J_lᵀ u‖²`` is every layer's estimate at once, each a sum of squares (never
  negative) that involves only its own block. One plain backward per probe, no second
  derivative.
* **hvp** (the default for label losses, whose residual is not zero and whose Hessian is
  not Gauss–Newton): the parameter-space probe above, with Hessian-vector products.

Probes continue until the running mean of every layer's trace moved by at most ``tol``
(relative) on the last probe and its standard error is at most ``tol`` of it too (see
:meth:`Running.settled`), at least ``min_probes`` and at most ``max_probes`` of them. Each
layer reports its standard error and its number of probes. Each probe draws a fresh vector
per chunk of a few calibration examples (see :class:`Probe`), which cuts the variance
by the number of chunks at no extra cost.

A Hessian-vector product differentiates twice through the model. torch's fused CPU
attention kernels have no double backward, so the products run under the math SDPA
backend (restored afterwards). With the default self-distillation loss at the FP
weights the residual is zero, so ``H`` is the Gauss–Newton matrix (positive
semi-definite) and every trace is ≥ 0 in expectation.

HAWQ's score of a candidate is ``Ω(l, b) = Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖²``, which is
``Tr(H_l) · mse(l, b)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mpsearch.errors import WorkloadError
from mpsearch.quant.layers import LayerTable
from mpsearch.sensitivity.profile import SENSITIVITY, Method, Options
from mpsearch.workload.losses import is_zero_residual, rademacher

Mode = Literal["all", "per-layer"]
Estimator = Literal["auto", "gn", "hvp"]

DEFAULT_TOL = 0.05
DEFAULT_MIN_PROBES = 8
DEFAULT_MAX_PROBES = 48


@dataclass
class Running:
    """Running mean and standard error of one layer's probe values."""

    values: list[float] = field(default_factory=list)

    moved: float = math.inf

    def add(self, x: float) -> None:
        """Add a probe, noting how far it moved the mean, relative to the new mean."""
        before = self.mean
        self.values.append(x)
        after = self.mean
        if len(self.values) > 1:
            self.moved = 0.0 if after == before else abs(after - before) / abs(after) if after else math.inf

    def settled(self, tol: float) -> bool:
        """The last probe moved the mean by at most ``tol`` (relative), and the standard error
        says the mean is not expected to move by more than that either.

        The first alone is the classic rule (PyHessian's); a lucky probe close to the mean
        satisfies it long before the mean is known, so the second guards it.
        """
        if all(x == 0 for x in self.values):
            return len(self.values) > 1  # a layer the loss never reaches
        return self.moved <= tol and self.stderr <= tol * abs(self.mean)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else 0.0

    @property
    def stderr(self) -> float:
        k = len(self.values)
        if k < 2:
            return math.inf
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.values) / (k - 1) / k)


@dataclass
class Traces:
    """Per-layer trace estimates, with their standard errors and probe counts."""

    trace: dict[str, float]
    stderr: dict[str, float]
    probes: dict[str, int]
    products: int  # Hessian-vector products, or for gn backward passes of ⟨u, output⟩
    seconds: float
    mode: str
    estimator: str = "hvp"


class Probe:
    """One Hutchinson probe over the calibration set: ``v_lᵀ H_ll v_l`` estimates per layer.

    The calibration set is taken in chunks of ``chunk`` examples and a fresh Rademacher ``v``
    is drawn for each: ``H = Σ_c H_c / N``, so ``Σ_c v_cᵀ H_c v_c / N`` is still unbiased for
    ``Tr(H)``, and since the chunks' terms are independent its variance is about 1/C of one
    shared ``v``'s. The products cost the same in total; only the chunks are smaller.
    """

    def __init__(self, workload, model: nn.Module, table: LayerTable, chunk: int | None = 4, estimator: str = "hvp"):
        if not workload.loss_fn.differentiable:
            raise WorkloadError(
                f"loss.kind {workload.spec.loss.kind!r} is not differentiable, so it has no Hessian; "
                "use --method perturbation, or a differentiable loss"
            )
        self.workload = workload
        self.model = model
        modules = dict(model.named_modules())
        self.names = table.names
        self.params = [modules[name].weight for name in self.names]
        self.chunks = list(_chunks(workload, chunk))
        self.estimator = estimator

    def __call__(self, generator: torch.Generator, layers: list[int] | None = None) -> list[float]:
        """Each layer's estimate from one probe; ``layers``: only these get a nonzero ``v``."""
        if self.estimator == "gn":
            return self._gauss_newton(generator)
        used = list(range(len(self.params))) if layers is None else layers
        params = [self.params[i] for i in used]
        sums = [0.0] * len(self.params)
        total_count = 0.0
        with sdpa_kernel([SDPBackend.MATH]), torch.enable_grad():
            for batch, ref in self.chunks:
                total, count = self.workload.loss_fn(self.workload.forward(self.model, batch), ref, batch)
                total_count += float(count)
                grads = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
                v = [rademacher(p, generator) for p in params]
                pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None and g.requires_grad]
                if not pairs:
                    continue  # the loss does not reach these layers
                dot = sum((g * vi).sum() for g, vi in pairs)
                hv = torch.autograd.grad(dot, params, allow_unused=True)
                for i, vi, h in zip(used, v, hv):
                    if h is not None:
                        sums[i] += float((vi * h).sum())
        return [x / total_count for x in sums]

    def _gauss_newton(self, generator: torch.Generator) -> list[float]:
        """``‖J_lᵀ u‖²`` per layer, ``u`` drawn per chunk with covariance ``H_out``."""
        sums = [0.0] * len(self.params)
        total_count = 0.0
        with torch.enable_grad():
            for batch, ref in self.chunks:
                out = self.workload.forward(self.model, batch)
                _total, count = self.workload.loss_fn(out, ref, batch)  # for its count: the loss is Σ total / Σ count
                total_count += float(count)
                grads = torch.autograd.grad(self.workload.loss_fn.direction(out, batch, generator), self.params, allow_unused=True)
                for i, g in enumerate(grads):
                    if g is not None:
                        sums[i] += float(g.double().pow(2).sum())
        return [x / total_count for x in sums]


def resolve_estimator(workload, estimator: str = "auto") -> str:
    """``auto``: ``gn`` where the loss has zero residual at the FP weights, else ``hvp``."""
    if estimator == "auto":
        return "gn" if is_zero_residual(workload.spec.loss.kind) else "hvp"
    if estimator not in ("gn", "hvp"):
        raise ValueError(f"estimator must be 'auto', 'gn' or 'hvp', got {estimator!r}")
    return estimator


def _chunks(workload, size: int | None):
    """The calibration batches cut into chunks of ``size`` examples (whole if None), with their FP outputs."""
    from mpsearch.workload.losses import Outputs

    for batch, ref in zip(workload.calibration_batches(), workload.reference("calibration")):
        n = len(next(iter(batch.values())))
        step = size or n
        for start in range(0, n, step):
            part = {k: v[start : start + step] for k, v in batch.items()}
            yield part, None if ref is None else Outputs(ref.value[start : start + step], ref.kind)


def _prepared(workload, estimator: str = "hvp") -> tuple[Probe, LayerTable]:
    model = workload.build_model()
    model.requires_grad_(False)
    table = workload.layer_table()
    # gn's u is independent per example already; its cross-example terms measured small on
    # MiniLM (per-probe spread 0.13 of the mean at chunks of 16 vs 0.15 at 4), so whole batches.
    probe = Probe(workload, model, table, chunk=None if estimator == "gn" else 4, estimator=estimator)
    for p in probe.params:
        p.requires_grad_(True)
    return probe, table


def hessian_traces(
    workload,
    mode: Mode = "all",
    tol: float = DEFAULT_TOL,
    min_probes: int = DEFAULT_MIN_PROBES,
    max_probes: int = DEFAULT_MAX_PROBES,
    seed: int = 0,
    progress: bool = False,
    estimator: Estimator = "auto",
) -> Traces:
    """Every quantizable layer's Hessian trace; see the module docstring.

    ``estimator`` applies to ``mode="all"``; the per-layer loop is always Hessian-vector
    products, one layer at a time.
    """
    from tqdm.auto import tqdm

    estimator = resolve_estimator(workload, estimator) if mode == "all" else "hvp"
    probe, table = _prepared(workload, estimator)
    generator = torch.Generator().manual_seed(seed)
    stats = {name: Running() for name in table.names}
    probes_of = {}
    products = 0
    start = time.perf_counter()
    if mode == "all":
        bar = tqdm(total=max_probes, desc=f"hessian traces ({estimator}, all layers per probe)", unit="probe", disable=not progress, leave=False)
        for k in range(1, max_probes + 1):
            for name, x in zip(table.names, probe(generator)):
                stats[name].add(x)
            products += 1
            bar.update()
            if k >= min_probes and all(stats[name].settled(tol) for name in table.names):
                break
        bar.close()
        probes_of = {name: len(stats[name].values) for name in table.names}
    elif mode == "per-layer":
        bar = tqdm(total=len(table.names), desc="hessian traces (one layer per product)", unit="layer", disable=not progress, leave=False)
        for i, name in enumerate(table.names):
            for k in range(1, max_probes + 1):
                products += 1
                stats[name].add(probe(generator, layers=[i])[i])
                if k >= min_probes and stats[name].settled(tol):
                    break
            probes_of[name] = len(stats[name].values)
            bar.update()
        bar.close()
    else:
        raise ValueError(f"mode must be 'all' or 'per-layer', got {mode!r}")
    return Traces(
        trace={name: s.mean for name, s in stats.items()},
        stderr={name: s.stderr for name, s in stats.items()},
        probes=probes_of,
        products=products,
        seconds=time.perf_counter() - start,
        mode=mode,
        estimator=estimator,
    )


def total_trace(
    workload,
    tol: float = DEFAULT_TOL,
    min_probes: int = DEFAULT_MIN_PROBES,
    max_probes: int = DEFAULT_MAX_PROBES,
    seed: int = 0,
) -> tuple[float, float, int]:
    """One Hutchinson estimate of the whole trace, PyHessian-style: (trace, stderr, probes).

    It stops when the running mean of the total moved by at most ``tol``; it is the
    baseline that the per-layer, all-at-once estimate is measured against.
    """
    probe, _table = _prepared(workload)
    generator = torch.Generator().manual_seed(seed)
    running = Running()
    for k in range(1, max_probes + 1):
        running.add(sum(probe(generator)))
        if k >= min_probes and running.settled(tol):
            break
    return running.mean, running.stderr, len(running.values)


def hawq_scores(traces: Traces, bank) -> dict[str, dict[int, float]]:
    """Ω(l, b) = Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖² for every candidate of the bank."""
    errors = bank.errors()
    return {
        name: {bits: traces.trace[name] * e["mse"] for bits, e in per_bits.items()}
        for name, per_bits in errors.items()
    }


def _params(workload, options: Options) -> dict:
    return {
        "mode": options.mode,
        "estimator": resolve_estimator(workload, options.estimator) if options.mode == "all" else "hvp",
        "tol": options.tol if options.tol is not None else DEFAULT_TOL,
        "min_probes": DEFAULT_MIN_PROBES,
        "max_probes": options.max_probes if options.max_probes is not None else DEFAULT_MAX_PROBES,
        "seed": options.seed,
    }


def _rows(workload, params: dict, options: Options, pool, progress: bool) -> list[dict]:
    traces = hessian_traces(
        workload, mode=params["mode"], estimator=params["estimator"], tol=params["tol"], max_probes=params["max_probes"], seed=params["seed"], progress=progress
    )
    scores = hawq_scores(traces, workload.candidate_bank(progress=progress))
    return [
        {
            "name": layer.name,
            "n": layer.n,
            "trace": traces.trace[layer.name],
            "trace_stderr": traces.stderr[layer.name] if math.isfinite(traces.stderr[layer.name]) else None,
            "probes": traces.probes[layer.name],
            "score": {str(b): v for b, v in scores[layer.name].items()},
        }
        for layer in workload.layer_table().layers
    ]


SENSITIVITY.register("hessian")(Method(label="Ω = Tr(H)/n · ‖Q(W) − W‖²", params=_params, compute=_rows))
