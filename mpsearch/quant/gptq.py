"""Error-compensating post-training quantization (GPTQ-style), written from the math.

For one layer with weight ``W`` (rows × cols) and calibration inputs ``X`` (N × cols),
the goal is codes whose dequantized ``Ŵ`` keeps the layer's output:

    minimize ‖X Wᵀ − X Ŵᵀ‖²_F = Σ_rows (w − ŵ) H (w − ŵ)ᵀ,   H = XᵀX.

Each row is an independent quadratic problem sharing the same ``H``. Quantizing the
columns one at a time, left to right, the optimal correction after fixing column ``i``
to its grid value moves the columns not yet quantized by

    W[:, i+1:] −= (w_i − ŵ_i) / U[i, i] · U[i, i+1:],

where ``U`` is the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``). Row ``i`` of ``U``
is, up to the factor ``U[i, i]``, the row of the inverse Hessian of the columns ``i:``
that remain after the earlier ones were fixed, so one factorization serves every step.
(This is the optimal-brain-surgeon update, with the inverse kept as a Cholesky factor
instead of being downdated column by column.)

Details:

* **Damping.** ``H + λ·mean(diag H)·I`` with ``λ = damp`` keeps the factorization
  stable; a column whose input is always zero gets ``H_ii = 1`` (nothing to protect).
  If the Cholesky factorization still fails, λ is raised tenfold, up to three times.
* **Lazy block updates.** Columns are processed in blocks; inside a block the update is
  applied column by column, and the rest of the matrix receives the whole block's
  update as one matrix product. The result is the same, with far fewer passes over ``W``.
* **Groups.** Each group's grid (scale, zero point) is fitted, by the same rule as
  round-to-nearest, when its first column is reached, so it sees the corrections from
  earlier groups. Every group starts a new block for that reason.
* **Activation order** (``act_order``): columns are processed in decreasing ``H_ii``,
  so the inputs with the most energy are fixed first while the most freedom is left to
  compensate. The grids are then fitted up front on the original weight ("static
  groups"), so the stored format is exactly the round-to-nearest one: codes in the
  original column order, one scale per group, no permutation to store.
* **Clipping** (``clip``): each grid's range is shrunk where that lowers the group's squared
  error, as in :func:`~mpsearch.quant.rtn.fit_grid`; GPTQ then compensates what the clipped
  weights lose, like any other rounding error. With ``weighted``, each column's error counts
  in proportion to ``H_ii``, its input's mean square: a weight on a loud input is clipped less.
  (On MiniLM's layers, held-out output error, act order, group 128: 0.987, 0.945 and 0.967 of
  plain clipping's at 2, 3 and 4 bits. Weighing by the group's whole block of ``H`` did no better.)

The candidates of a mixed-precision bank must not depend on which bits other layers
get, so ``H`` always comes from the full-precision model's inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mpsearch.errors import MPSearchError
from mpsearch.quant.rtn import Grid, QuantizedWeight, _pad_cols, fit_grid


@dataclass
class Curvature:
    """A layer's prepared ``H``: the processing order, the Cholesky factor of ``H⁻¹`` and, in the
    weight's own column order, ``diag H`` over its mean (each input's relative mean square)."""

    u: torch.Tensor
    perm: torch.Tensor | None
    damp: float
    diag: torch.Tensor | None = None

    @classmethod
    def from_moment(cls, xtx: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> "Curvature":
        """Factor ``XᵀX`` (any positive scale: only ratios matter) for :func:`quantize_gptq`.

        >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        >>> c = Curvature.from_moment(x.T @ x)
        >>> c.u.shape, bool(torch.all(torch.diag(c.u) > 0))
        (torch.Size([8, 8]), True)
        """
        # float64 cols² matrices: at most three alive at once (a 1536-input layer's are 19 MB each).
        h = xtx.to(torch.float64, copy=True)
        diag = torch.diagonal(h)
        dead = diag <= 0
        h[dead, dead] = 1.0
        energy = (diag / diag.mean()).to(torch.float32)
        perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
        if perm is not None:
            h = h[perm][:, perm]
        mean_diag = torch.diagonal(h).mean()
        damped = torch.empty_like(h)
        for attempt in range(4):
            lam = damp * 10**attempt
            damped.copy_(h).diagonal().add_(lam * mean_diag)
            chol, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                break
        else:
            raise MPSearchError(
                f"the calibration second moment is not positive definite even with damping {lam:g}; "
                "use more calibration data or raise quant.damp"
            )
        del h, damped
        h_inv = torch.cholesky_inverse(chol)
        del chol
        u = torch.linalg.cholesky(h_inv, upper=True)
        return cls(u=u.to(torch.float32), perm=perm, damp=lam, diag=energy)


def quantize_gptq(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    curvature: Curvature,
    symmetric: bool = True,
    scale_dtype: str = "float16",
    block_size: int = 128,
    clip: bool = False,
    weighted: bool = False,
) -> QuantizedWeight:
    """Quantize a (rows × cols) matrix so that ``X Ŵᵀ`` stays close to ``X Wᵀ``.

    Returns the same :class:`QuantizedWeight` format as round-to-nearest.

    >>> g = torch.Generator().manual_seed(0)
    >>> w, x = torch.randn(16, 32, generator=g), torch.randn(256, 32, generator=g)
    >>> curv = Curvature.from_moment(x.T @ x)
    >>> from mpsearch.quant.rtn import quantize_rtn
    >>> err = lambda q: float(((w - q.dequantize()) @ x.T).norm())
    >>> err(quantize_gptq(w, 3, 16, curv)) < err(quantize_rtn(w, 3, 16))
    True
    """
    rows, cols = w.shape
    g = cols if group_size == -1 else group_size
    n_groups = math.ceil(cols / g)
    if curvature.u.shape != (cols, cols):
        raise MPSearchError(f"the curvature is {tuple(curvature.u.shape)} but the weight has {cols} inputs")
    work = w.to(torch.float32).clone()
    u = curvature.u.to(work.device)
    perm = curvature.perm.to(work.device) if curvature.perm is not None else None

    energy = curvature.diag.to(work.device) if clip and weighted and curvature.diag is not None else None
    grid: Grid | None = None
    group_of = torch.arange(cols, device=work.device) // g
    if perm is not None:
        # Static groups: grids from the original weight, then work in activation order.
        padded = _pad_cols(work, n_groups * g).reshape(rows, n_groups, g)
        importance = _pad_cols(energy[None, :], n_groups * g).reshape(1, n_groups, g) if energy is not None else None
        grid = fit_grid(padded, bits, symmetric, scale_dtype, clip, importance)
        work, group_of = work[:, perm], group_of[perm]
        starts = set(range(0, cols, block_size))
    else:
        # Every group starts a block, so its grid is fitted on fully corrected columns.
        starts = set(range(0, cols, block_size)) | set(range(0, cols, g))
        scales = torch.empty(rows, n_groups, dtype=_dtype(scale_dtype), device=work.device)
        zeros = None if symmetric else torch.empty(rows, n_groups, dtype=torch.uint8, device=work.device)
        offset = torch.empty(rows, n_groups, device=work.device)

    codes = torch.empty(rows, cols, dtype=torch.uint8, device=work.device)
    bounds = sorted(starts) + [cols]
    for b0, b1 in zip(bounds, bounds[1:]):
        chunk = work[:, b0:b1].clone()
        errors = torch.empty_like(chunk)
        for j in range(b1 - b0):
            i = b0 + j
            if perm is None and i % g == 0:  # then j == 0 and work[:, i:] holds every correction so far
                fitted = fit_grid(work[:, i : i + g], bits, symmetric, scale_dtype, clip, energy[i : i + g] if energy is not None else None)
                k = i // g
                scales[:, k], offset[:, k] = fitted.scales, fitted.offset
                if zeros is not None:
                    zeros[:, k] = fitted.zeros
            k = int(group_of[i])
            s = (grid.scales if grid is not None else scales)[:, k].to(torch.float32)
            off = (grid.offset if grid is not None else offset)[:, k]
            q = torch.clamp(torch.round(chunk[:, j] / s + off), 0, 2**bits - 1)
            codes[:, i] = q.to(torch.uint8)
            err = (chunk[:, j] - s * (q - off)) / u[i, i]
            chunk[:, j + 1 :] -= err[:, None] * u[i, i + 1 : b1][None, :]
            errors[:, j] = err
        work[:, b1:] -= errors @ u[b0:b1, b1:]

    if perm is not None:
        unpermuted = torch.empty_like(codes)
        unpermuted[:, perm] = codes
        return QuantizedWeight(codes=unpermuted, scales=grid.scales, zeros=grid.zeros, bits=bits, group_size=g)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=g)


def _dtype(scale_dtype: str) -> torch.dtype:
    from mpsearch.quant.scheme import SCALE_DTYPES

    return SCALE_DTYPES[scale_dtype]
