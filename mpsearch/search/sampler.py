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

import copy
import warnings

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.samplers import BaseSampler

from mpsearch.search.allocate import Costs, repair

ATTR_PROPOSAL = "proposal"


def search_space(costs: Costs) -> dict[str, IntDistribution]:
    return {name: IntDistribution(0, len(costs.menu) - 1) for name in costs.names}


def make_sampler(kind: str, seed: int, costs: Costs | None = None, budget: int | None = None) -> BaseSampler:
    """Optuna's TPE (multivariate, constant liar for trials in flight), NSGA-II or random, or
    :class:`LevelSwitchSampler` (``evo``, which needs the costs and the budget)."""
    if kind == "evo":
        if costs is None or budget is None:
            raise ValueError("the evo sampler needs the costs and the budget")
        return LevelSwitchSampler(costs, budget, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=seed)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r}")


class LevelSwitchSampler(BaseSampler):
    """An evolutionary local search around the best plans found so far (``sampler = "evo"``).

    Each proposal takes a parent among the ``parents`` best complete trials (the better, the
    likelier), applies one or more *level switches* — one layer up a step of the menu,
    another down a step, so bytes move between layers rather than appear — and repairs the
    result to fit and be maximal. A child already evaluated is drawn again (up to
    ``tries`` times). With nothing complete yet it proposes uniformly random indices, which the
    repair makes into plans. The idea is EvoPress's (Sieberling et al., 2024): the true loss
    of a plan is not the sum of per-layer losses, and a search on real evaluations around the
    best plan corrects what an additive model (the ILP warm start) gets wrong.
    """

    def __init__(self, costs: Costs, budget: int, seed: int = 0, parents: int = 4, tries: int = 32, fill: bool = True):
        self.costs, self.budget, self.fill = costs, budget, fill
        self.parents, self.tries = parents, tries
        self.rng = np.random.default_rng(seed)

    def infer_relative_search_space(self, study, trial):
        return search_space(self.costs)

    def sample_relative(self, study, trial, search_space):
        from optuna.trial import TrialState

        complete = [t for t in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True) if t.values]
        if not complete:
            return {}
        names = self.costs.names
        top = sorted(complete, key=lambda t: tuple(t.values))[: self.parents]
        weights = 1.0 / np.arange(1, len(top) + 1)
        seen = {tuple(int(t.params[n]) for n in names) for t in study._get_trials(deepcopy=False, use_cache=True) if len(t.params) == len(names)}
        top_width = len(self.costs.menu) - 1
        child = None
        for _ in range(self.tries):
            parent = top[self.rng.choice(len(top), p=weights / weights.sum())]
            index = np.array([int(parent.params[n]) for n in names], dtype=np.int64)
            for _ in range(int(self.rng.geometric(0.5))):
                up = np.flatnonzero(index < top_width)
                down = np.flatnonzero(index > 0)
                if len(up) == 0 or len(down) == 0:
                    break
                i = int(self.rng.choice(up))
                j = int(self.rng.choice(down[down != i])) if len(down[down != i]) else i
                index[i] += 1
                if j != i:
                    index[j] -= 1
            child = repair(self.costs, index, self.budget, fill=self.fill)
            if tuple(int(x) for x in child) not in seen:
                break
        return {n: int(j) for n, j in zip(names, child)}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return int(self.rng.integers(param_distribution.low, param_distribution.high + 1))


class _Window:
    """The study as the base sampler sees it: the ``best`` lowest-loss and the ``recent`` latest
    finished trials, plus every trial in flight.

    TPE's cost grows with every trial it models (about 300 ms per proposal at 5,000 trials of
    37 layers); the best and the latest carry what it learns from, so its cost stays flat as
    a study grows. Everything but the trial lists is the study's own.
    """

    def __init__(self, study, best: int, recent: int):
        self._study = study
        trials = study._get_trials(deepcopy=False, states=None, use_cache=True)
        finished = [t for t in trials if t.state.is_finished()]
        if len(finished) > best + recent:
            scored = [t for t in finished if t.values]
            keep = {t.number for t in sorted(scored, key=lambda t: tuple(t.values))[:best]}
            keep |= {t.number for t in finished[-recent:]}
            trials = [t for t in trials if not t.state.is_finished() or t.number in keep]
        self._trials = trials  # one pass over the study per proposal, however often it is asked

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy=deepcopy, states=states)


class RepairingSampler(BaseSampler):
    """``base``'s proposals, repaired to fit ``budget`` (see the module docstring).

    The base sampler sees a window of the study (:class:`_Window`): the ``window_best`` best
    and ``window_recent`` latest finished trials (50 and 100: TPE's proposals then cost
    about the same at 5,000 trials as at 150).
    """

    def __init__(self, base: BaseSampler, costs: Costs, budget: int, fill: bool = True, window_best: int = 50, window_recent: int = 100):
        self.window = (window_best, window_recent)
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
            view = _Window(study, *self.window)
            proposal = dict(self.base.sample_relative(view, trial, self.space) or {})
            for name, distribution in self.space.items():
                if name not in proposal:
                    proposal[name] = self.base.sample_independent(view, trial, name, distribution)
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
