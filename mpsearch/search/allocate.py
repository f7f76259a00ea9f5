"""Bit allocation under an exact byte budget: the ILP, the greedy plan, and the repair.

Every allocator works on a :class:`Costs` table: for each layer and each bit-width of the
menu, the layer's exact bytes (codes, scales and zero points, from the
:class:`~mpsearch.quant.layers.LayerTable`) and an additive cost, the sensitivity
profile's estimate of how much the loss grows with the layer at that width. Costs are made
monotone first (fewer bits never cost less than more bits), so raising a layer never
looks harmful and "no room to raise anything" is a well-defined end state.

* :func:`ilp` is exact for the additive model: one binary per (layer, bits), one choice per
  layer, ``Σ bytes ≤ budget``, minimise ``Σ cost``; solved by HiGHS through
  ``scipy.optimize.milp``.
* :func:`repair` turns any plan into one that fits and is *maximal* (no single layer can
  go up one step and still fit; a step is to the next width of other bytes, see :attr:`Costs.steps`): while over budget, lower the layer whose step down costs
  the least loss per byte saved; then, while something fits, raise the layer whose step
  up gains the most loss per byte added. Ties go to the earlier layer, so it is
  deterministic.
* :func:`greedy` is the repair of the all-lowest plan: the classic "most benefit per
  byte" allocation.

Each allocator returns a :class:`~mpsearch.plan.Plan`. Inside, plans are index arrays into the
menu (``index[l] = j`` gives layer ``l`` the bits ``menu[j]``), which is what the samplers and
the vectorised loops work on; :meth:`Costs.plan` and :meth:`Costs.index` convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping

import numpy as np

from mpsearch.errors import BudgetError, MPSearchError
from mpsearch.plan import Plan, width_key

PlanLike = Plan | Mapping[str, int] | np.ndarray


@dataclass(frozen=True)
class Costs:
    """Per-layer bytes and additive loss costs at each entry of ``menu`` (ascending): a bit-width,
    or a scheme option (``"2g32"``; :data:`~mpsearch.plan.Width`)."""

    names: tuple[str, ...]
    menu: tuple[int, ...]
    nbytes: np.ndarray  # (layers, widths) int64, exact bytes of each layer at each width
    cost: np.ndarray  # (layers, widths) float64, monotone non-increasing along widths
    other_bytes: int
    levels: np.ndarray | None = None  # (layers, widths) the menu position of the entry each layer takes at each width (gguf; equal options); None: its own
    # The table's reader of a plan's menu entries (LayerTable.widths: a choice is matched by what it
    # quantizes to, so a resolved plan reads back as its entries); None: Plan.widths.
    widths_of: Callable[[Plan], dict] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, table, scores: Mapping[str, Mapping[int | str, float]] | None) -> "Costs":
        """From a layer table and a profile's ``{layer: {bits: score}}`` (None: all zero).

        Scores are clamped at 0 (a perturbation Δloss can come out a hair negative) and
        made monotone: the cost at ``b`` bits is at least the cost at every wider width.
        Where a layer cannot take a width (the gguf target's types), its column is the width it
        takes instead: same bytes, same cost, and the plan holds that width.
        """
        names = tuple(table.names)
        menu = tuple(table.menu)
        taken = [[table.layer_level(n, b) for b in menu] for n in names]
        nbytes = np.array([[table.layer_bytes(n, b) for b in menu] for n in names], dtype=np.int64)
        cost = np.zeros((len(names), len(menu)))
        if scores is not None:
            for i, n in enumerate(names):
                per = {width_key(k): v for k, v in scores[n].items()}
                cost[i] = [max(float(per.get(b, 0.0) or 0.0), 0.0) for b in taken[i]]
            cost = np.maximum.accumulate(cost[:, ::-1], axis=1)[:, ::-1]
        same = all(row == list(menu) for row in taken)
        position = {w: j for j, w in enumerate(menu)}
        levels = None if same else np.array([[position[w] for w in row] for row in taken], dtype=np.int64)
        return cls(names, menu, nbytes, cost, int(table.other_bytes), levels, table.widths)

    def index(self, plan: PlanLike) -> np.ndarray:
        """The menu index of each layer's bits (an index array is returned as a copy)."""
        if isinstance(plan, np.ndarray):
            return plan.astype(np.int64, copy=True)
        plan = Plan.coerce(plan)
        bits = self.widths_of(plan) if self.widths_of is not None else plan.widths()
        position = {b: j for j, b in enumerate(self.menu)}
        try:
            return np.array([position[bits[n]] for n in self.names], dtype=np.int64)
        except KeyError as e:
            raise MPSearchError(f"the plan holds {e.args[0]!r}, which is not in the study's menu {list(self.menu)}") from None

    def plan(self, index: np.ndarray) -> Plan:
        if self.levels is not None:
            return Plan.of_bits({n: self.menu[int(self.levels[i, int(j)])] for i, (n, j) in enumerate(zip(self.names, index))})
        return Plan.of_bits({n: self.menu[int(j)] for n, j in zip(self.names, index)})

    def bytes_of(self, plan: PlanLike) -> int:
        return int(self.nbytes[np.arange(len(self.names)), self.index(plan)].sum()) + self.other_bytes

    def cost_of(self, plan: PlanLike) -> float:
        return float(self.cost[np.arange(len(self.names)), self.index(plan)].sum())

    @cached_property
    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        """``(down, up)``, each (layers × widths): the width one step down (up) from each width,
        or the width itself where there is none. Down is the next one that costs fewer bytes (a
        step down must make room); up is the next one of another candidate, which costs as many
        bytes or more. Across the menu that is the neighbour; a width that stands for another
        (gguf target) is stepped over, so a step always changes the plan, and an equal-byte width
        of other codes (compressed-tensors' asymmetric layers: a byte a code at 2 to 8 bits) is a
        free step up."""
        layers, widths = self.nbytes.shape
        level = self.levels if self.levels is not None else np.tile(np.arange(widths), (layers, 1))
        down = np.tile(np.arange(widths), (layers, 1))
        up = down.copy()
        for i in range(layers):
            for j in range(widths):
                lower = [k for k in range(j) if self.nbytes[i, k] < self.nbytes[i, j]]
                higher = [k for k in range(j + 1, widths) if level[i, k] != level[i, j] and self.nbytes[i, k] >= self.nbytes[i, j]]
                down[i, j] = lower[-1] if lower else j
                up[i, j] = higher[0] if higher else j
        return down, up

    def check_budget(self, budget: int) -> None:
        lowest = self.bytes_of(np.zeros(len(self.names), dtype=np.int64))
        if budget < lowest:
            raise BudgetError("budget", f"{budget} bytes is below the smallest plan ({lowest} bytes, every layer at {self.menu[0]} bits); raise it")


def is_maximal(costs: Costs, plan: PlanLike, budget: int) -> bool:
    """No single layer can go up one step of the menu and still fit."""
    index = costs.index(plan)
    return not _raises(costs, index, budget - costs.bytes_of(index)).any()


def _raises(costs: Costs, index: np.ndarray, slack: int) -> np.ndarray:
    rows = np.arange(len(costs.names))
    up = costs.steps[1][rows, index]
    extra = costs.nbytes[rows, up] - costs.nbytes[rows, index]
    return (up != index) & (extra <= slack)


def repair(costs: Costs, plan: PlanLike, budget: int, fill: bool = True) -> Plan:
    """The plan made to fit ``budget`` (and, with ``fill``, maximal); see the module docstring."""
    return costs.plan(repair_index(costs, costs.index(plan), budget, fill))


def repair_index(costs: Costs, index: np.ndarray, budget: int, fill: bool = True) -> np.ndarray:
    """:func:`repair` on a menu-index array (a new array; the samplers' form)."""
    costs.check_budget(budget)
    index = np.array(index, dtype=np.int64)
    rows = np.arange(len(costs.names))
    used = costs.bytes_of(index)
    while used > budget:
        down = costs.steps[0][rows, index]
        saved = costs.nbytes[rows, index] - costs.nbytes[rows, down]
        loss = costs.cost[rows, down] - costs.cost[rows, index]
        rate = np.where(saved > 0, loss / np.maximum(saved, 1), np.inf)
        i = int(np.argmin(rate))  # first of the ties
        index[i] = down[i]
        used -= int(saved[i])
    if fill:
        while True:
            can = _raises(costs, index, budget - used)
            if not can.any():
                break
            up = costs.steps[1][rows, index]
            extra = costs.nbytes[rows, up] - costs.nbytes[rows, index]
            gain = costs.cost[rows, index] - costs.cost[rows, up]
            rate = np.where(can, gain / np.maximum(extra, 1), -np.inf)
            i = int(np.argmax(rate))
            index[i] = up[i]
            used += int(extra[i])
    return index


def greedy(costs: Costs, budget: int) -> Plan:
    """Every layer at the lowest width, then raised by most loss gained per byte while it fits."""
    return repair(costs, np.zeros(len(costs.names), dtype=np.int64), budget)


def ilp(costs: Costs, budget: int, fill: bool = True, allowed: np.ndarray | None = None) -> Plan:
    """The plan of least total cost with ``bytes ≤ budget``, exactly (HiGHS via scipy).

    Optimal plans can leave slack that an equal-cost raise would use; ``fill`` raises
    layers into it (never increasing the cost, since costs are monotone). ``allowed``
    (layers × widths, bool) restricts the widths each layer may take.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    costs.check_budget(budget)
    layers, widths = costs.cost.shape
    n = layers * widths
    one_each = np.zeros((layers, n))
    for i in range(layers):
        one_each[i, i * widths : (i + 1) * widths] = 1
    # Bytes relative to the all-lowest plan keep the coefficients small and well scaled.
    base = costs.nbytes[:, :1]
    extra = (costs.nbytes - base).reshape(1, n).astype(float)
    room = budget - costs.bytes_of(np.zeros(layers, dtype=np.int64))
    scale = float(np.abs(costs.cost).max()) or 1.0
    result = milp(
        c=(costs.cost / scale).reshape(n),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(extra, -np.inf, room)],
        integrality=np.ones(n),
        bounds=Bounds(0, np.ones(n) if allowed is None else np.asarray(allowed, dtype=float).reshape(n)),
        options={"time_limit": 30.0},
    )
    if result.x is None:
        raise BudgetError("budget", f"no plan fits {budget} bytes ({result.message}); raise it")
    index = result.x.reshape(layers, widths).argmax(axis=1).astype(np.int64)
    return repair(costs, index, budget, fill=fill)


def single_switches(costs: Costs, plan: PlanLike) -> list[tuple[int, int, np.ndarray]]:
    """``(layer, step, index)`` for each layer moved alone one step down (``step`` -1) or up (+1)
    the menu from ``plan``, where it has such a step (:attr:`Costs.steps`): the plans whose loss
    changes :func:`relinearised` takes."""
    index = costs.index(plan)
    moves = []
    for i in range(len(index)):
        for step, to in ((-1, costs.steps[0]), (1, costs.steps[1])):
            if to[i, index[i]] != index[i]:
                moved = index.copy()
                moved[i] = to[i, index[i]]
                moves.append((i, step, moved))
    return moves


def relinearised(costs: Costs, plan: PlanLike, down: np.ndarray, up: np.ndarray, budget: int) -> Plan:
    """The ILP re-solved on local costs around ``plan``: ``down[l]`` and ``up[l]`` are the measured
    loss changes of moving layer ``l`` alone one step down or up the menu from ``plan`` (NaN where
    there is no such step). Each layer may stay, or take one of those steps; the plan of least
    total change that fits ``budget`` is returned (maximal, with ``repair``'s fill on the local
    costs). Anchored at the current plan, the costs hold the interactions that an ILP on
    single-layer costs measured from the FP model misses (EvoPress's lesson), to first order.
    """
    index = costs.index(plan)
    layers, widths = costs.cost.shape
    rows = np.arange(layers)
    local = np.zeros((layers, widths))
    allowed = np.zeros((layers, widths), dtype=bool)
    allowed[rows, index] = True
    for moves, delta in ((costs.steps[0], np.asarray(down, dtype=float)), (costs.steps[1], np.asarray(up, dtype=float))):
        j = moves[rows, index]
        ok = (j != index) & np.isfinite(delta)
        allowed[rows[ok], j[ok]] = True
        local[rows[ok], j[ok]] = delta[ok]
    # Outside a layer's neighbourhood nothing was measured: no gain is assumed above it, and
    # the ILP may not go there (the fill may, into slack only, at no assumed gain).
    pad = float(np.abs(local).max()) or 1.0
    for i in range(layers):
        top = int(np.flatnonzero(allowed[i]).max())
        local[i, top + 1 :] = local[i, top]
        bottom = int(np.flatnonzero(allowed[i]).min())
        local[i, :bottom] = local[i, bottom] + pad
    anchored = Costs(costs.names, costs.menu, costs.nbytes, local, costs.other_bytes, costs.levels, costs.widths_of)
    return ilp(anchored, budget, allowed=allowed)
