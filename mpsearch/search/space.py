"""The search space: how a plan becomes a trial's Optuna parameters, and back.

Each layer is one Optuna parameter, named after the layer. Two encodings:

* :class:`LogBitsSpace` (studies made by this version): the parameter is the layer's bits on a
  log scale, so Optuna's tools show bits and TPE sees an ordered, evenly spaced axis;
* :class:`MenuIndexSpace` (studies made by mpsearch 0.1.0, read and resumed as they are): the
  parameter is an index into the bit-width menu.

A study records which in its meta (``space``); the plan itself is stored with every trial (see
:mod:`mpsearch.storage.trials`), with its exact bytes and bpw. Samplers work on menu indices
(:meth:`index` and :meth:`params_of` convert).
"""

from __future__ import annotations

from typing import Any, Mapping

from optuna.distributions import IntDistribution

from mpsearch.plan import Plan
from mpsearch.search.allocate import Costs
from mpsearch.storage.trials import BPW, BYTES


class MenuIndexSpace:
    """Plans as menu indices, one :class:`~optuna.distributions.IntDistribution` per layer."""

    def __init__(self, costs: Costs, table):
        self.costs, self.table = costs, table
        self.distributions = {name: IntDistribution(0, len(costs.menu) - 1) for name in costs.names}

    def params(self, plan: Plan) -> dict[str, int]:
        return self.params_of(self.costs.index(plan))

    def params_of(self, index) -> dict[str, int]:
        return {name: int(j) for name, j in zip(self.costs.names, index)}

    def index(self, params: Mapping[str, Any]):
        import numpy as np

        return np.array([int(params[name]) for name in self.costs.names], dtype=np.int64)

    def plan(self, params: Mapping[str, Any]) -> Plan:
        return self.costs.plan(self.index(params))

    def describe(self, plan: Plan) -> dict[str, Any]:
        return {BYTES: self.costs.bytes_of(plan), BPW: self.table.bpw(plan)}


class LogBitsSpace:
    """Plans as bits, one log-scale :class:`~optuna.distributions.FloatDistribution` per layer.

    A trial's parameters are its layers' real bit-widths (``4.0``), so Optuna's tools
    (optuna-dashboard, ``optuna trials``) show bits. The distribution runs from the menu's lowest
    to its highest width on a log scale, where 2 → 3 → 4 → 8 → 16 are nearly even steps, so TPE's
    kernels treat neighbouring widths as neighbours; a proposal between two widths is read as the
    nearer one in log scale (the plan then goes through the repair, and what is stored is the
    plan's own bits).
    """

    def __init__(self, costs: Costs, table):
        import math

        from optuna.distributions import FloatDistribution

        self.costs, self.table = costs, table
        low, high = min(costs.menu), max(costs.menu)
        self.distributions = {name: FloatDistribution(float(low), float(high), log=True) for name in costs.names}
        self._logs = [math.log(b) for b in costs.menu]

    def params(self, plan: Plan) -> dict[str, float]:
        bits = plan.bits()
        return {name: float(bits[name]) for name in self.costs.names}

    def params_of(self, index) -> dict[str, float]:
        return {name: float(self.costs.menu[int(j)]) for name, j in zip(self.costs.names, index)}

    def index(self, params: Mapping[str, Any]):
        """The menu index nearest to each layer's proposed bits, in log scale."""
        import math

        import numpy as np

        logs = np.array(self._logs)
        return np.array([int(np.abs(logs - math.log(float(params[n]))).argmin()) for n in self.costs.names], dtype=np.int64)

    def plan(self, params: Mapping[str, Any]) -> Plan:
        return self.costs.plan(self.index(params))

    def describe(self, plan: Plan) -> dict[str, Any]:
        return {BYTES: self.costs.bytes_of(plan), BPW: self.table.bpw(plan)}


SPACES = {"log-bits": LogBitsSpace, "menu-index": MenuIndexSpace}


def space_for(meta: Mapping[str, Any], costs: Costs, table):
    """The encoding a study was made with (mpsearch 0.1.0's studies say none: menu indices)."""
    return SPACES[meta.get("space", "menu-index")](costs, table)
