"""Scoring a plan that leaves the first blocks FP from where it starts to differ.

A perturbation scan scores ``2 × layers`` plans that each quantize one layer and leave every
other FP. Up to that layer's block the model computes exactly what the FP model computes, so
running those blocks again is wasted: on average half of every forward pass. :class:`FpPrefix`
keeps the FP model's outputs of some blocks (the *checkpoints*) on each batch, taken from
forward passes that had to run anyway, and a later forward whose first ``k`` blocks are FP starts
from the last checkpoint at or before ``k``: each block before it returns the kept output instead
of running (only the last one's output is read on).

The blocks are the model's transformer layers (:func:`~mpsearch.quant.blockwise.blocks_of`).
A plan that quantizes a layer outside them (an embedding table runs before them) skips nothing.
The kept outputs stay on the model's device within :data:`BUDGET_BYTES` a split: every block
while they fit (MiniLM, SmolLM2 on the CI study), else evenly spaced checkpoints. They are
dropped when the workload next scores a whole plan (a search's first trial, after its scan).

The skip must change no bit of the loss. The first skipped forward of each split is therefore
also run in full and the two losses compared; if they differ at all (a model whose blocks share
state the kept output does not carry), skipping is switched off for the workload, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

BUDGET_BYTES = 512 * 2**20  # the kept block outputs of one split, on the model's device


class FpPrefix:
    """The FP block outputs of one workload's splits, for :meth:`Workload.evaluate`'s ``fp_blocks``."""

    def __init__(self, blocks_of: Callable[[nn.Module], list[tuple[str, nn.Module]]], budget_bytes: int = BUDGET_BYTES):
        self._blocks_of = blocks_of
        self.budget_bytes = budget_bytes
        self.enabled = True
        self._checked: set[str] = set()  # splits whose first skip was checked against a full forward
        self._kept: dict[str, dict[int, list]] = {}  # split -> {p: [output of block p-1 on batch i, or None]}
        self._points: dict[str, list[int]] = {}  # split -> the checkpoints p (prefix lengths), ascending
        self._models: dict[int, list[tuple[str, nn.Module]]] = {}
        self.skipped_blocks = 0  # block forwards saved so far (what the tests and the benchmark read)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        key = id(model)
        if key not in self._models:
            self._models = {key: self._blocks_of(model)}  # one model at a time: a scorer's lent model
        return self._models[key]

    def forget(self) -> None:
        """Drop the kept outputs (a whole plan is being scored: the scan that used them is over)."""
        self._kept.clear()
        self._points.clear()

    def fp_blocks(self, model: nn.Module, quantized) -> int:
        """How many leading blocks of ``model`` hold none of the ``quantized`` layers (all the
        others FP); 0 when one of them lies outside every block."""
        names = [name for name, _ in self.blocks(model)]
        first = len(names)
        for layer in quantized:
            inside = [k for k, name in enumerate(names) if layer.startswith(f"{name}.")]
            if not inside:
                return 0
            first = min(first, inside[0])
        return first

    def forward(self, model: nn.Module, split: str, index: int, n_batches: int, fp_blocks: int, run: Callable[[], object], check: Callable[[object, object], bool]):
        """``run()`` (the model's forward on batch ``index`` of ``split``), skipping what the kept
        outputs allow when the first ``fp_blocks`` blocks of ``model`` are FP; ``check(a, b)`` says
        whether two outputs give the same loss (used on the first skip of each split)."""
        blocks = [module for _, module in self.blocks(model)] if self.enabled and fp_blocks > 0 else []
        if not blocks:
            return run()
        fp_blocks = min(fp_blocks, len(blocks))
        kept = self._kept.setdefault(split, {})
        start = max((p for p, outs in kept.items() if p <= fp_blocks and outs[index] is not None), default=0)
        with self._capturing(blocks, split, index, n_batches, start, fp_blocks):
            if not start:
                return run()
            with self._skipping(blocks, kept[start][index], start):
                out = run()
        if split not in self._checked:
            self._checked.add(split)
            full = run()
            if not check(out, full):
                self.enabled = False
                log.warning("scoring from kept block outputs changed the loss on this model; every block is run from now on")
                return full
        self.skipped_blocks += start
        return out

    @contextlib.contextmanager
    def _skipping(self, blocks: list[nn.Module], output, start: int):
        """Blocks ``0 … start−1`` return ``output`` (block ``start−1``'s) without running. A
        forward of a block's own (accelerate's hooks set one) is put back after."""
        own = [block.__dict__.get("forward") for block in blocks[:start]]
        given = _copied(output)  # a block that changes its input in place changes a copy, not what is kept
        for block in blocks[:start]:
            block.forward = lambda *args, **kwargs: given
        try:
            yield
        finally:
            for block, forward in zip(blocks[:start], own):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    @contextlib.contextmanager
    def _capturing(self, blocks: list[nn.Module], split: str, index: int, n_batches: int, start: int, fp_blocks: int):
        """Keep the outputs of the checkpoints ``start < p ≤ fp_blocks`` this forward computes
        (FP ones: every block up to ``fp_blocks`` is)."""
        handles = []

        def keep(p: int):
            def hook(_module, _args, output):
                points = self._points.get(split)
                if points is None:
                    points = self._points[split] = _checkpoints(len(blocks), _nbytes(output) * n_batches, self.budget_bytes)
                if p in points:
                    self._kept[split].setdefault(p, [None] * n_batches)[index] = _copied(output)  # the next block may change it in place
            return hook

        for p in range(start + 1, fp_blocks + 1):
            if p in self._points.get(split, range(1, len(blocks) + 1)) and self._kept[split].get(p, [None] * n_batches)[index] is None:
                handles.append(blocks[p - 1].register_forward_hook(keep(p)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _checkpoints(n_blocks: int, per_block: int, budget: int) -> list[int]:
    """Which prefix lengths to keep: all ``n_blocks`` when they fit in ``budget``, else as many as
    fit, evenly spaced (none when not even one does).

    >>> _checkpoints(30, 10, 1000)[-3:]
    [28, 29, 30]
    >>> _checkpoints(30, 100, 400)
    [6, 12, 18, 24]
    """
    count = min(n_blocks, budget // max(per_block, 1))
    return sorted({round((j + 1) * n_blocks / (count + 1)) if count < n_blocks else j + 1 for j in range(count)})


def _nbytes(output) -> int:
    tensors = [output] if torch.is_tensor(output) else [t for t in output if torch.is_tensor(t)] if isinstance(output, (tuple, list)) else []
    return sum(t.numel() * t.element_size() for t in tensors)


def _copied(output):
    if torch.is_tensor(output):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(t.detach().clone() if torch.is_tensor(t) else t for t in output)
    return output
