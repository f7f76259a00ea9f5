"""The samplers: Optuna's, and mpsearch's own, each proposing only plans that fit.

Samplers are picked by name from :data:`SAMPLERS` (``search.sampler`` in a spec). Each entry
builds an Optuna sampler from the seed, the :class:`~mpsearch.search.allocate.Costs` and the
byte budget.

How a sampler learns from the plan actually evaluated: :class:`RepairingSampler` wraps the
chosen sampler and asks it for the *whole* plan at once (the trial log hands it the study as a
window of the best and latest trials; see :mod:`mpsearch.storage.trials`), repairs that proposal
to fit the budget (and to be maximal), and hands the repaired plan back as the trial's
parameters. So the parameters stored with a trial, which are what TPE, NSGA-II and random read as
history, are exactly the plan that was evaluated; the raw proposal is kept as a user attribute
(``proposal``) for diagnosis. Warm starts and re-runs carry fixed plans and skip the sampler.

A repaired proposal that was already evaluated (TPE converging, or two proposals that repair to
the same maximal plan) is moved by level switches (see :func:`level_switch`) until it is new, so a
trial is not spent on a plan the study has scored; the driver tells a repeat that still gets
through its earlier value without counting it as a trial.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from mpsearch.errors import SpecError
from mpsearch.registry import Registry
from mpsearch.search.allocate import Costs, repair_index
from mpsearch.storage.trials import PROPOSAL, RERUN_OF, SAMPLED, SEARCHED, SOURCE

PROPOSED_BY = "proposed_by"  # which of a hand-off sampler's two proposed the plan (HandoffSampler)
SCREENED = "screened"  # how many children the fitted model chose the plan from (LevelSwitchSampler's screen)


@dataclass(frozen=True)
class SamplerContext:
    """What a sampler may use: the seed, the costs (bytes and additive loss estimates), the budget,
    and the space (how plans are Optuna parameters: ``index`` and ``params_of`` convert); and the
    spec's ``search.screen`` and ``search.patience`` (the screened samplers' children per
    proposal, and the sampled trials without a better plan after which a hand-off sampler hands
    over)."""

    seed: int
    costs: Costs
    budget: int
    space: Any
    fill: bool = True
    screen: int = 64
    patience: int = 32


SAMPLERS: Registry[Callable[[SamplerContext], BaseSampler]] = Registry("sampler")


def _quiet(make: Callable[[], BaseSampler]) -> BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return make()


@SAMPLERS.register("tpe")
def _tpe(ctx: SamplerContext) -> BaseSampler:
    """Optuna's TPE, multivariate, with a constant liar for the trials in flight."""
    return _quiet(lambda: optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=ctx.seed))


@SAMPLERS.register("nsga2")
def _nsga2(ctx: SamplerContext) -> BaseSampler:
    return _quiet(lambda: optuna.samplers.NSGAIISampler(seed=ctx.seed))


@SAMPLERS.register("random")
def _random(ctx: SamplerContext) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=ctx.seed)


@SAMPLERS.register("evo")
def _evo(ctx: SamplerContext) -> BaseSampler:
    return LevelSwitchSampler(ctx.costs, ctx.budget, ctx.space, seed=ctx.seed, fill=ctx.fill)


@SAMPLERS.register("tpe-evo")
def _tpe_evo(ctx: SamplerContext) -> BaseSampler:
    return HandoffSampler(_tpe(ctx), _evo(ctx), patience=ctx.patience)


@SAMPLERS.register("evo-screened")
def _evo_screened(ctx: SamplerContext) -> BaseSampler:
    return LevelSwitchSampler(ctx.costs, ctx.budget, ctx.space, seed=ctx.seed, fill=ctx.fill, screen=ctx.screen)


@SAMPLERS.register("tpe-evo-screened")
def _tpe_evo_screened(ctx: SamplerContext) -> BaseSampler:
    return HandoffSampler(_tpe(ctx), _evo_screened(ctx), patience=ctx.patience)


def make_sampler(kind: str, ctx: SamplerContext) -> BaseSampler:
    """The sampler named ``kind``, repaired to fit (see the module docstring)."""
    return RepairingSampler(sampler_factory(kind)(ctx), ctx.costs, ctx.budget, ctx.space, fill=ctx.fill, seed=ctx.seed)


def level_switch(index: np.ndarray, width: int, rng: np.random.Generator, most: int | None = None, steps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``index`` (menu positions per layer) after one or more level switches: a layer one step
    up the menu and another one step down, so bytes move between layers rather than appear (a
    geometric number of switches: one half the time, two a quarter, ..., at most ``most``).
    ``steps``: :attr:`~mpsearch.search.allocate.Costs.steps`, where a step skips the widths that
    stand for another (gguf target); by default a step is to the neighbouring position."""
    index = np.array(index, copy=True)
    rows = np.arange(len(index))
    count = int(rng.geometric(0.5))
    for _ in range(count if most is None else min(count, most)):
        higher = steps[1][rows, index] if steps is not None else np.minimum(index + 1, width)
        lower = steps[0][rows, index] if steps is not None else np.maximum(index - 1, 0)
        up = np.flatnonzero(higher != index)
        down = np.flatnonzero(lower != index)
        if len(up) == 0 or len(down) == 0:
            break
        i = int(rng.choice(up))
        others = down[down != i]
        j = int(rng.choice(others)) if len(others) else i
        index[i] = higher[i]
        if j != i:
            index[j] = lower[j]
    return index


def sampler_factory(kind: str) -> Callable[[SamplerContext], BaseSampler]:
    """The registry entry for ``search.sampler``; an unknown name lists the known ones."""
    if kind not in SAMPLERS:
        raise SpecError("search.sampler", f"unknown sampler {kind!r}; choose one of: {', '.join(SAMPLERS.names())}")
    return SAMPLERS.get(kind)


class LevelSwitchSampler(BaseSampler):
    """An evolutionary local search around the best plans found so far (``sampler = "evo"``).

    Each proposal takes a parent among the ``parents`` best complete trials (the better, the
    likelier), applies one to ``switches`` *level switches* — one layer up a step of the menu,
    another down a step, so bytes move between layers rather than appear — and repairs the
    result to fit and be maximal. A child already evaluated is drawn again (up to ``tries``
    times). The first children are one per warm start (every baseline seeds the search, not
    only the best few); with a pruner on, each child is screened on the first stages before it
    is scored whole. With nothing complete yet it proposes uniformly random indices, which the
    repair makes into plans.
    With ``screen`` (``sampler = "evo-screened"``, and ``"tpe-evo-screened"`` once TPE hands off)
    each sampled child is the one of ``screen`` new children that the additive model fitted to the
    trials predicts lowest (:mod:`mpsearch.search.surrogate`): EvoPress screens its offspring on a
    few tokens, this on what the study has measured, at no evaluation at all. The trial records how
    many children it was chosen from (``screened``).
    The idea is EvoPress's (Sieberling et al., 2024): the true loss of a plan is not the sum of
    per-layer losses, and a search on real evaluations around the best plan corrects what an
    additive model (the ILP warm start) gets wrong.
    """

    def __init__(self, costs: Costs, budget: int, space, seed: int = 0, parents: int = 4, tries: int = 32, fill: bool = True, switches: int = 3, screen: int = 0):
        self.costs, self.budget, self.space, self.fill = costs, budget, space, fill
        self.parents, self.tries, self.switches, self.screen = parents, tries, switches, screen
        self.rng = np.random.default_rng(seed)
        self.last_notes: dict = {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        self.last_notes = {}
        trials = [t for t in study.get_trials(deepcopy=False) if len(t.params) == len(self.costs.names)]
        complete = [t for t in trials if t.state.name == "COMPLETE" and t.values]
        if not complete:
            return {}
        names = self.costs.names
        top = sorted(complete, key=lambda t: tuple(t.values))[: self.parents]
        weights = 1.0 / np.arange(1, len(top) + 1)
        seen = {tuple(self.space.index(t.params)) for t in trials}
        # Seeding: while there are fewer sampled trials than warm starts, the next warm start is the parent.
        warm = [t for t in complete if t.user_attrs.get(SOURCE) not in SEARCHED and t.user_attrs.get(RERUN_OF) is None]
        sampled = sum(t.user_attrs.get(SOURCE) == SAMPLED for t in trials if t.state.is_finished())
        if sampled >= len(warm) and self.screen > 1 and len(complete) > 1:
            return self.space.params_of(self._screened(complete, top, weights, seen))
        child = None
        for attempt in range(self.tries):
            if sampled < len(warm) and attempt == 0:
                parent = warm[sampled]
            else:
                parent = top[self.rng.choice(len(top), p=weights / weights.sum())]
            child = self._child(self.space.index(parent.params))
            if tuple(int(x) for x in child) not in seen:
                break
        return self.space.params_of(child)

    def _child(self, index: np.ndarray) -> np.ndarray:
        index = level_switch(index, len(self.costs.menu) - 1, self.rng, most=self.switches, steps=self.costs.steps)
        return repair_index(self.costs, index, self.budget, fill=self.fill)

    def _screened(self, complete, top, weights, seen) -> np.ndarray:
        """Of ``screen`` new children of the best plans, the one the additive model fitted to the trials
        (:mod:`mpsearch.search.surrogate`) predicts lowest."""
        from mpsearch.search.surrogate import fit_additive

        model = fit_additive(self.costs, np.array([self.space.index(t.params) for t in complete]), np.array([t.values[0] for t in complete]))
        parents = [self.space.index(t.params) for t in top]
        children: dict[tuple[int, ...], np.ndarray] = {}
        for _ in range(self.screen * 4):  # children are often repeats near a well-searched best
            child = self._child(parents[self.rng.choice(len(parents), p=weights / weights.sum())])
            key = tuple(int(x) for x in child)
            if key not in seen:
                children.setdefault(key, child)
                if len(children) >= self.screen:
                    break
        if not children:
            return child
        rows = np.array(list(children.values()))
        self.last_notes = {SCREENED: len(rows)}
        return rows[int(np.argmin(model.predict(rows)))]

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.space.params_of(self.rng.integers(0, len(self.costs.menu), len(self.costs.names)))[param_name]


class HandoffSampler(BaseSampler):
    """A global sampler until it stalls, then level switches around the best (``sampler = "tpe-evo"``).

    ``explore`` (TPE) proposes while it keeps finding better plans. Once ``patience`` sampled
    trials in a row have not improved on the best plan (or have not beaten the warm starts at
    all), ``refine`` (:class:`LevelSwitchSampler`) takes over for good: its proposals are marked
    (``proposed_by``), and a best plan that ``refine`` proposed, or a stall, keeps it in charge.
    The decision reads only the trials the sampler is shown, so a resumed study picks up where it
    was. A ``--pareto`` study stays with ``explore``. Why: on the default study TPE's gains flatten after about a hundred trials while level
    switches around its best still find better plans, and on an LLM's hundreds of layers TPE's
    random start-up never reaches the warm start, which level switches improve from the first.
    """

    def __init__(self, explore: BaseSampler, refine: BaseSampler, patience: int = 32):
        self.explore, self.refine, self.patience = explore, refine, patience
        self.last_notes: dict = {}

    def refining(self, study) -> bool:
        if len(study.directions) > 1:  # a --pareto study: level switches keep the bytes, a front needs TPE's spread
            return False
        finished = sorted((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()), key=lambda t: t.number)
        complete = [t for t in finished if t.state.name == "COMPLETE" and t.values]
        if not complete:
            return False
        best = min(complete, key=lambda t: tuple(t.values))
        if best.user_attrs.get(PROPOSED_BY) == "refine":
            return True
        sampled = [t for t in finished if t.user_attrs.get(SOURCE) == SAMPLED]
        return len(sampled) >= self.patience and best.number < sampled[-self.patience].number

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        phase = "refine" if self.refining(study) else "explore"
        sampler = getattr(self, phase)
        proposal = sampler.sample_relative(study, trial, search_space)
        self.last_notes = {PROPOSED_BY: phase, **getattr(sampler, "last_notes", {})}
        return proposal

    def sample_independent(self, study, trial, param_name, param_distribution):
        sampler = self.refine if self.last_notes.get(PROPOSED_BY) == "refine" else self.explore
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.explore.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.explore.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.explore.reseed_rng()


class RepairingSampler(BaseSampler):
    """``base``'s proposals, repaired to fit ``budget`` (see the module docstring).

    After each proposal, ``last_notes`` holds the attributes the trial log records with it:
    the unrepaired proposal.
    """

    def __init__(self, base: BaseSampler, costs: Costs, budget: int, space, fill: bool = True, seed: int = 0, tries: int = 64):
        self.base = base
        self.costs = costs
        self.budget = budget
        self.space = space
        self.fill = fill
        self.tries = tries
        self.rng = np.random.default_rng(seed)  # for moving a repeat (the base sampler keeps its own)
        self.seen: set[tuple[int, ...]] = set()  # every plan proposed or shown in the window, as menu positions
        self.last_notes: dict = {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            proposal = dict(self.base.sample_relative(study, trial, search_space) or {})
            for name, distribution in search_space.items():
                if name not in proposal:
                    proposal[name] = self.base.sample_independent(study, trial, name, distribution)
        raw = self.space.index(proposal)
        fixed = repair_index(self.costs, raw, self.budget, fill=self.fill)
        self.last_notes = {PROPOSAL: [self.costs.menu[int(x)] for x in raw], **getattr(self.base, "last_notes", {})}  # in bits
        self.seen.update(tuple(int(x) for x in self.space.index(t.params)) for t in study.get_trials(deepcopy=False) if len(t.params) == len(self.costs.names))
        moves = 0
        while tuple(int(x) for x in fixed) in self.seen and moves < self.tries:  # scored already: move it
            fixed = repair_index(self.costs, level_switch(fixed, len(self.costs.menu) - 1, self.rng, steps=self.costs.steps), self.budget, fill=self.fill)
            moves += 1
        if moves:
            self.last_notes["moved"] = moves  # level switches that made the repeat new
        self.seen.add(tuple(int(x) for x in fixed))
        return self.space.params_of(fixed)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.base.reseed_rng()
