"""Round-to-nearest group-wise quantization of a weight matrix.

For a group of weights ``w`` at ``b`` bits, with ``L = 2**b − 1`` the largest code:

* symmetric: the signed grid ``ŵ = s·(q − 2**(b−1))``, whose levels run from
  ``−2**(b−1)·s`` to ``(2**(b−1) − 1)·s``. Zero is a level, all ``2**b`` levels are used,
  and ``s = max(max(w, 0) / (2**(b−1) − 1), max(−w, 0) / 2**(b−1))`` is the smallest step
  that fits both signs, so every weight is within half a step of its level.
  (On MiniLM, a grid without a zero level loses over twice as much at 3 bits.)
* asymmetric: ``lo = min(w, 0)``, ``hi = max(w, 0)``, ``s = (hi − lo) / L``, an integer
  zero point ``z = round(−lo / s)`` stored as uint8, and ``ŵ = s·(q − z)``.

With ``clip`` (the scheme's ``clip = "mse"``), each group's range is then shrunk: the grid is
refitted on ``p·w`` for ``p`` from 1 down to 0.5 in steps of 0.01, and the group keeps the
``p`` whose grid gives the smallest squared error on ``w`` itself (codes clamped to the grid).
Clipping the few largest weights buys a finer step for all the others; at 2–4 bits that is
nearly always worth it. ``p = 1`` is among the choices, so no group gets worse, but the
half-step bound above then holds only for the unclipped groups.

In both, ``q = clamp(round(w/s + offset), 0, L)``, computed with the scale already
rounded to its storage dtype, so the stored codes and scales reproduce ``ŵ`` exactly. The
scale is rounded *up* to that dtype: rounded to nearest, an fp16 step can fall short of the
range by up to 255·2⁻¹¹ of a step at 8 bits, and the extreme weights would be clipped past
the half-step bound.
Groups run along the input dimension; a row whose length is not a multiple of the group
size has a shorter last group (zero padding changes neither ``max|w|`` nor ``lo``/``hi``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mpsearch.quant.scheme import SCALE_DTYPES


@dataclass
class QuantizedWeight:
    """Unpacked codes (rows × cols, uint8), per-group scales and optional zero points."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.codes.shape
        g = self.group_size
        n_groups = self.scales.shape[1]
        q = _pad_cols(self.codes.to(torch.float32), n_groups * g).reshape(rows, n_groups, g)
        offset = self.zeros.to(torch.float32)[..., None] if self.zeros is not None else float(2 ** (self.bits - 1))
        w = self.scales.to(torch.float32)[..., None] * (q - offset)
        return w.reshape(rows, n_groups * g)[:, :cols].to(dtype)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True, scale_dtype: str = "float16", clip: bool = False) -> QuantizedWeight:
    """Quantize a (rows × cols) matrix group-wise by round-to-nearest.

    >>> w = torch.tensor([[0.5, -1.0, 0.25, 1.0]])
    >>> q = quantize_rtn(w, bits=2, group_size=4)
    >>> q.codes.tolist(), q.scales.tolist()
    ([[2, 1, 2, 3]], [[1.0]])
    >>> q.dequantize().tolist()
    [[0.0, -1.0, 0.0, 1.0]]
    """
    rows, cols = w.shape
    g = cols if group_size == -1 else group_size
    n_groups = math.ceil(cols / g)
    x = _pad_cols(w.to(torch.float32), n_groups * g).reshape(rows, n_groups, g)
    grid = fit_grid(x, bits, symmetric, scale_dtype, clip)
    q = grid.codes(x)
    codes = q.reshape(rows, n_groups * g)[:, :cols].contiguous()
    return QuantizedWeight(codes=codes, scales=grid.scales, zeros=grid.zeros, bits=bits, group_size=g)


@dataclass
class Grid:
    """The quantization grid of each group: ``ŵ = scale·(q − offset)`` for integer ``q ∈ [0, top]``.

    ``scales`` and ``zeros`` are what is stored; ``offset`` is ``zeros`` (asymmetric) or
    ``2**(b−1)`` (symmetric) as float32, shaped like ``scales``.
    """

    scales: torch.Tensor
    zeros: torch.Tensor | None
    offset: torch.Tensor
    top: int

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest codes (uint8) of ``x``, shaped ``scales.shape + (k,)`` or like ``scales``."""
        s, off = self.scales.to(torch.float32), self.offset
        if x.dim() == s.dim() + 1:
            s, off = s[..., None], off[..., None]
        return torch.clamp(torch.round(x / s + off), 0, self.top).to(torch.uint8)


CLIP_SHRINKS = tuple(round(1 - i / 100, 2) for i in range(1, 51))  # 0.99 … 0.50, after 1.0 itself


def fit_grid(x: torch.Tensor, bits: int, symmetric: bool, scale_dtype: str, clip: bool = False, importance: torch.Tensor | None = None) -> Grid:
    """The grid of each group of ``x`` (``… × group`` float32): the module docstring's rule,
    with each group's range shrunk where that lowers its squared error when ``clip``.
    ``importance`` (broadcast against ``x``: each input column's weight, e.g. its mean squared
    activation) weighs that error column by column.

    >>> x = torch.tensor([[[0.3, -0.5, 0.2, 0.45, -0.4, 0.9]]])
    >>> plain, clipped = fit_grid(x, 2, True, "float16"), fit_grid(x, 2, True, "float16", clip=True)
    >>> err = lambda g: float(((g.scales[..., None].float() * (g.codes(x).float() - g.offset[..., None]) - x) ** 2).sum())
    >>> round(err(plain), 3), round(err(clipped), 3)  # 0.9 is clipped to 0.51: the rest round finer
    (0.653, 0.252)
    """
    grid = _range_grid(x, bits, symmetric, scale_dtype, 1.0)
    if not clip:
        return grid
    best = _grid_error(grid, x, importance)
    for shrink in CLIP_SHRINKS:
        trial = _range_grid(x, bits, symmetric, scale_dtype, shrink)
        error = _grid_error(trial, x, importance)
        better = error < best
        best = torch.where(better, error, best)
        grid.scales = torch.where(better, trial.scales, grid.scales)
        grid.offset = torch.where(better, trial.offset, grid.offset)
        if grid.zeros is not None:
            grid.zeros = torch.where(better, trial.zeros, grid.zeros)
    return grid


def _grid_error(grid: Grid, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Each group's squared error on ``x`` under ``grid``, each column weighted by ``importance``."""
    s, off = grid.scales.to(torch.float32)[..., None], grid.offset[..., None]
    error = (s * (grid.codes(x).to(torch.float32) - off) - x) ** 2
    return (error if importance is None else error * importance).sum(dim=-1)


def _range_grid(x: torch.Tensor, bits: int, symmetric: bool, scale_dtype: str, shrink: float) -> Grid:
    """The grid that just covers each group's range, scaled by ``shrink``."""
    if shrink != 1.0:
        x = x * shrink
    top = 2**bits - 1
    dtype = SCALE_DTYPES[scale_dtype]
    tiny = torch.finfo(dtype).tiny
    if symmetric:
        half = 2 ** (bits - 1)
        step = torch.maximum(x.amax(dim=-1).clamp_min(0) / (half - 1), (-x.amin(dim=-1)).clamp_min(0) / half)
        scales = _round_up(step, dtype).clamp_min(tiny)
        return Grid(scales, None, torch.full(scales.shape, float(half), device=x.device), top)
    lo, hi = x.amin(dim=-1).clamp_max(0), x.amax(dim=-1).clamp_min(0)
    scales = _round_up((hi - lo) / top, dtype).clamp_min(tiny)
    zeros = torch.round(-lo / scales.to(torch.float32)).clamp(0, top).to(torch.uint8)
    return Grid(scales, zeros, zeros.to(torch.float32), top)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive float32 ``x`` in ``dtype``, never smaller than ``x``."""
    y = x.to(dtype)
    if dtype.itemsize == 2:
        short = y.to(torch.float32) < x
        # For positive floats the next representable value is the next bit pattern.
        y = torch.where(short, (y.view(torch.int16) + 1).view(dtype), y)
    return y


def _pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - x.shape[1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x
