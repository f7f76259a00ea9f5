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
* **hvp**: the parameter-space probe above, with Hessian-vector products: the exact Hessian of
  a label loss (``causal-lm``), whose residual is not zero. It is not the default there: its
  per-layer traces can come out negative and rarely settle. ``auto`` takes ``gn`` for every
  loss; for a label loss that is the Gauss–Newton matrix, the Hessian's positive semi-definite
  part (the Fisher of the model's own predictive distribution), which ranks layers usably.

A trace below zero, or one still moving when the probes run out, is flagged (``flags`` in the
profile: ``negative``, ``probe-limit``), and a flagged profile is not used for a warm start
unless the spec asks for it (``search.flagged_warm_starts``).

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

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mpsearch.errors import WorkloadError
from mpsearch.quant.layers import LayerTable
from mpsearch.sensitivity.profile import SENSITIVITY, Method, Options
from mpsearch.workload.losses import rademacher

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
    settled: dict[str, bool] = field(default_factory=dict)

    def flags(self, name: str) -> list[str]:
        """What makes a layer's trace unusable as a score: below zero, or still moving at the probe limit."""
        flags = []
        if self.trace[name] < 0:
            flags.append("negative")
        if not self.settled.get(name, True):
            flags.append("probe-limit")
        return flags


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
        """``‖J_lᵀ u‖²`` per layer, ``u`` drawn per chunk with covariance ``H_out``.

        Each layer's gradient is squared and dropped as soon as the backward pass has it (a hook
        per weight), so no more than one layer's gradient is alive at a time, not the model's.
        """
        sums = [0.0] * len(self.params)
        total_count = 0.0

        def consume(i: int):
            def hook(p: torch.Tensor) -> None:
                sums[i] += float(p.grad.double().pow(2).sum())
                p.grad = None

            return hook

        handles = [p.register_post_accumulate_grad_hook(consume(i)) for i, p in enumerate(self.params)]
        try:
            with torch.enable_grad():
                for batch, ref in self.chunks:
                    out = self.workload.forward(self.model, batch)
                    total_count += self.workload.loss_fn.count(out, ref, batch)  # the loss is Σ total / Σ count
                    self.workload.loss_fn.direction(out, batch, generator).backward(inputs=self.params)
        finally:
            for handle in handles:
                handle.remove()
            for p in self.params:
                p.grad = None
        return [x / total_count for x in sums]


def resolve_estimator(workload, estimator: str = "auto") -> str:
    """``auto`` is ``gn``: the Hessian itself for the self-distillation losses (zero residual at the
    FP weights), and for a label loss (``causal-lm``) the Gauss–Newton matrix, its positive
    semi-definite part, which is the Fisher of the model's predictive distribution. ``hvp`` (the
    exact Hessian of a label loss) can come out negative per layer and is slow to settle."""
    if estimator == "auto":
        return "gn"
    if estimator not in ("gn", "hvp"):
        raise ValueError(f"estimator must be 'auto', 'gn' or 'hvp', got {estimator!r}")
    return estimator


GN_CHUNK_BYTES = 64 << 20  # what one gn chunk's backward pass may hold (at least one example)


def gn_chunk(workload) -> int | None:
    """Examples per gn chunk: whole batches, or for a language model as many as keep a chunk's
    backward pass within ``GN_CHUNK_BYTES``.

    Per token the pass holds about six vocabulary-sized float vectors (the logits, their
    log-softmax and softmax, the drawn direction, the gradients) and two floats per input and
    output feature of every quantizable layer (its input and its output kept for the backward
    pass): on SmolLM2, 3.6 MB per token by this count against 3.2 MB measured (RSS, one to two
    examples of 32 tokens).
    """
    refs = workload.reference("calibration")
    logits = workload.is_causal_lm or (refs and refs[0] is not None and refs[0].kind == "logits")
    vocab = getattr(getattr(workload.fp_model(), "config", None), "vocab_size", None)
    if not (logits and vocab):
        return None
    batches = workload.calibration_batches()
    tokens = max(b["input_ids"].shape[-1] for b in batches) if "input_ids" in batches[0] else 1
    features = sum(layer.rows + layer.cols for layer in workload.layer_table().layers)
    per_token = 4 * (6 * vocab + 2 * features)
    return max(1, GN_CHUNK_BYTES // (tokens * per_token))


def _chunks(workload, size: int | None):
    """The calibration batches cut into chunks of ``size`` examples (whole if None), with their FP outputs."""

    for batch, ref in zip(workload.calibration_batches(), workload.reference("calibration")):
        n = len(next(iter(batch.values())))
        step = size or n
        for start in range(0, n, step):
            part = {k: v[start : start + step] for k, v in batch.items()}
            yield part, None if ref is None else ref.map(lambda t, a=start, b=start + step: t[a:b])


@contextlib.contextmanager
def _prepared(workload, estimator: str = "hvp") -> Iterator[tuple[Probe, LayerTable]]:
    """A probe on the workload's own FP model (no copy: its weights are only read), with gradients
    on the quantizable layers' weights while it is in use."""
    model = workload.fp_model()
    table = workload.layer_table()
    # gn's u is independent per example already; its cross-example terms measured small on
    # MiniLM (per-probe spread 0.13 of the mean at chunks of 16 vs 0.15 at 4), so whole batches,
    # unless a big vocabulary's logits (and the backward pass behind them) call for fewer examples.
    probe = Probe(workload, model, table, chunk=gn_chunk(workload) if estimator == "gn" else 4, estimator=estimator)
    for p in probe.params:
        p.requires_grad_(True)
    try:
        yield probe, table
    finally:
        for p in probe.params:
            p.requires_grad_(False)
            p.grad = None


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
    estimator = resolve_estimator(workload, estimator) if mode == "all" else "hvp"
    start = time.perf_counter()
    with _prepared(workload, estimator) as (probe, table):
        stats, products = _probe_until_settled(probe, table, mode, estimator, tol, min_probes, max_probes, seed, progress)
    return Traces(
        trace={name: s.mean for name, s in stats.items()},
        stderr={name: s.stderr for name, s in stats.items()},
        probes={name: len(s.values) for name, s in stats.items()},
        products=products,
        seconds=time.perf_counter() - start,
        mode=mode,
        estimator=estimator,
        settled={name: s.settled(tol) for name, s in stats.items()},
    )


def _probe_until_settled(probe, table, mode, estimator, tol, min_probes, max_probes, seed, progress) -> tuple[dict[str, Running], int]:
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    stats = {name: Running() for name in table.names}
    products = 0
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
    elif mode == "per-layer":
        bar = tqdm(total=len(table.names), desc="hessian traces (one layer per product)", unit="layer", disable=not progress, leave=False)
        for i, name in enumerate(table.names):
            for k in range(1, max_probes + 1):
                products += 1
                stats[name].add(probe(generator, layers=[i])[i])
                if k >= min_probes and stats[name].settled(tol):
                    break
            bar.update()
        bar.close()
    else:
        raise ValueError(f"mode must be 'all' or 'per-layer', got {mode!r}")
    return stats, products


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
    generator = torch.Generator().manual_seed(seed)
    running = Running()
    with _prepared(workload) as (probe, _table):
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
        "tol": options.tol if options.tol is not None else workload.spec.sensitivity.tol,
        "min_probes": DEFAULT_MIN_PROBES,
        "max_probes": options.max_probes if options.max_probes is not None else workload.spec.sensitivity.max_probes,
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
            "flags": traces.flags(layer.name),
            "score": {str(b): v for b, v in scores[layer.name].items()},
        }
        for layer in workload.layer_table().layers
    ]


SENSITIVITY.register("hessian")(Method(label="Ω = Tr(H)/n · ‖Q(W) − W‖²", params=_params, compute=_rows))
