"""The search space and the sampler that only ever proposes plans that fit.

Each layer is one Optuna parameter, named after the layer, whose value is an *index* into
the bit-width menu (0 = the lowest). An index is ordinal, so TPE's kernels treat 3 and 4
bits as neighbours, which a categorical over {2, 3, 4, 8, 16} would not; the plan itself,
in bits, is stored with every trial.

How the sampler learns from the plan actually evaluated: :class:`RepairingSampler` wraps
Optuna's sampler and asks it for the *whole* plan at once (``sample_relative`` over the full
space; parameters it leaves out are drawn by its ``sample_independent``), repairs that
proposal to fit the budget (and to be maximal), and hands the repaired plan back as the
trial's parameters. So the parameters stored with a trial, which are what TPE, NSGA-II and
random read as history, are exactly the plan that was evaluated; the raw proposal is kept
only as a user attribute for diagnosis. Enqueued trials (warm starts, re-runs) carry fixed
parameters that the driver writes as they are, so they skip the sampler.
"""

from __future__ import annotations

import warnings

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.samplers import BaseSampler

from mpsearch.search.allocate import Costs, repair

ATTR_PROPOSAL = "proposal"


def search_space(costs: Costs) -> dict[str, IntDistribution]:
    return {name: IntDistribution(0, len(costs.menu) - 1) for name in costs.names}


def make_sampler(kind: str, seed: int) -> BaseSampler:
    """Optuna's TPE (multivariate, constant liar for trials in flight), NSGA-II or random."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r}")


class RepairingSampler(BaseSampler):
    """``base``'s proposals, repaired to fit ``budget`` (see the module docstring)."""

    def __init__(self, base: BaseSampler, costs: Costs, budget: int, fill: bool = True):
        self.base = base
        self.costs = costs
        self.budget = budget
        self.fill = fill
        self.space = search_space(costs)
        self.last_proposal: list[int] | None = None  # the unrepaired proposal, for the trial's record

    def infer_relative_search_space(self, study, trial):
        return dict(self.space)

    def sample_relative(self, study, trial, search_space):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            proposal = dict(self.base.sample_relative(study, trial, self.space) or {})
            for name, distribution in self.space.items():
                if name not in proposal:
                    proposal[name] = self.base.sample_independent(study, trial, name, distribution)
        raw = np.array([int(proposal[n]) for n in self.costs.names], dtype=np.int64)
        fixed = repair(self.costs, raw, self.budget, fill=self.fill)
        self.last_proposal = [int(x) for x in raw]
        return {name: int(j) for name, j in zip(self.costs.names, fixed)}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.base.reseed_rng()
