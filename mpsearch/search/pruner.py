"""The pruners: which sampled plans stop after a stage of their evaluation (multi-fidelity racing).

With a pruner other than ``none`` a trial scores the evaluation batches in stages
(``search.stages``, fractions of the evaluation set; see :func:`stage_bounds`). After each stage
the driver reports the running loss (``trial.report``: Σ total / Σ count so far, the step being
the examples scored) and asks the study's pruner whether to go on. Every trial sees the same
batches in the same order, so running losses at one step compare plans on the same examples.

Only full-fidelity losses become trial values and can be best; a pruned trial is stored as
PRUNED with its partial loss. Warm starts and re-runs are never pruned: the baselines are
reported at full fidelity, and their stages give the pruners their first yardsticks.

Pruners are picked by name from :data:`PRUNERS` (``search.pruner``):

* ``none``: every trial at full fidelity, in one pass;
* ``race``: :class:`RacePruner`, this module's rule (see there);
* ``forecast``: :class:`ForecastPruner`, the race with a margin for the noise of a stage: a plan
  stops when its full loss, forecast from its running loss, is clearly above the best's;
* ``halving``: Optuna's successive halving, one rung per stage;
* ``percentile``: Optuna's percentile pruner, the worst three quarters at each stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.trial import TrialState

from mpsearch.errors import SpecError
from mpsearch.registry import Registry


@dataclass(frozen=True)
class PrunerContext:
    """What a pruner may use: the steps (evaluation examples scored at the end of each stage; the
    last is the whole evaluation set)."""

    steps: tuple[int, ...]


PRUNERS: Registry[Callable[[PrunerContext], BasePruner]] = Registry("pruner")


@PRUNERS.register("none")
def _none(ctx: PrunerContext) -> BasePruner:
    return optuna.pruners.NopPruner()


@PRUNERS.register("race")
def _race(ctx: PrunerContext) -> BasePruner:
    return RacePruner()


@PRUNERS.register("forecast")
def _forecast(ctx: PrunerContext) -> BasePruner:
    return ForecastPruner()


@PRUNERS.register("halving")
def _halving(ctx: PrunerContext) -> BasePruner:
    """Optuna's successive halving with its rungs at the stages: the reduction factor is the
    (geometric mean) ratio between one stage's examples and the next's."""
    steps = ctx.steps
    factor = (steps[-1] / steps[0]) ** (1 / max(1, len(steps) - 1)) if len(steps) > 1 else 2.0
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=steps[0], reduction_factor=max(2, round(factor)), min_early_stopping_rate=0)


@PRUNERS.register("percentile")
def _percentile(ctx: PrunerContext) -> BasePruner:
    return optuna.pruners.PercentilePruner(25.0, n_startup_trials=4, n_warmup_steps=0)


def make_pruner(kind: str, ctx: PrunerContext) -> BasePruner:
    return pruner_factory(kind)(ctx)


def pruner_factory(kind: str) -> Callable[[PrunerContext], BasePruner]:
    """The registry entry for ``search.pruner``; an unknown name lists the known ones."""
    if kind not in PRUNERS:
        raise SpecError("search.pruner", f"unknown pruner {kind!r}; choose one of: {', '.join(PRUNERS.names())}")
    return PRUNERS.get(kind)


def _last_report(trial) -> tuple[int | None, float]:
    """The step and running loss of the trial's latest report (``None`` before its first): a
    non-finite running loss is pruned at once by both of mpsearch's rules."""
    step = trial.last_step
    return step, (math.nan if step is None else trial.intermediate_values[step])


class RacePruner(BasePruner):
    """Stop a plan at a stage where ``keep`` plans already scored at full fidelity did better on
    the same examples: it can no longer be among the ``keep`` best, so the rest of its evaluation
    would buy nothing.

    The comparison is paired (the same batches, in the same order, for every trial), which is
    what makes a stage of a quarter of the evaluation set a usable yardstick: the noise of the
    examples is shared by both plans. Until ``keep`` trials are complete nothing is pruned.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep

    def prune(self, study, trial) -> bool:
        step, value = _last_report(trial)
        if step is None or not math.isfinite(value):
            return step is not None
        better = 0
        for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            theirs = other.intermediate_values.get(step)
            if theirs is not None and theirs < value:
                better += 1
                if better >= self.keep:
                    return True
        return False


class ForecastPruner(BasePruner):
    """Stop a plan at a stage where its full loss, forecast from its running loss there, is above
    the best full loss by more than ``z`` times the forecast's error.

    The forecast is a line fitted, at that stage, to the full loss against the running loss of the
    ``neighbours`` complete trials whose running loss is nearest the plan's (chosen on the running
    loss, so the line is not biased; local, so a far-off warm start such as uniform 2-bit does not
    set it); its error is the residuals' standard deviation. :class:`RacePruner` compares
    running losses as they are, and near a well-searched best it stops nearly every child: the best
    trials were chosen on a full evaluation that includes the stage, so their running losses there
    are lucky, and a child that would tie them in full is behind them on the stage. The line
    regresses a running loss toward the mean as far as the complete trials show it should, and the
    margin keeps a plan the stage cannot yet tell from the best. Until ``warmup`` trials are
    complete nothing is pruned.
    """

    def __init__(self, z: float = 1.0, warmup: int = 8, neighbours: int = 32):
        self.z, self.warmup, self.neighbours = z, warmup, neighbours

    def prune(self, study, trial) -> bool:
        step, value = _last_report(trial)
        if step is None or not math.isfinite(value):
            return step is not None
        pairs = [(t.intermediate_values[step], t.values[0]) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if step in t.intermediate_values and t.values]
        if len(pairs) < self.warmup:
            return False
        pairs.sort(key=lambda pair: abs(pair[0] - value))
        running, full = (np.array(column, dtype=float) for column in zip(*pairs[: self.neighbours]))
        best = min(f for _, f in pairs)
        slope, intercept = np.polyfit(running, full, 1)
        error = math.sqrt(float(np.sum((full - (slope * running + intercept)) ** 2)) / (len(pairs) - 2))
        return slope * value + intercept - self.z * error > best


def stage_bounds(fractions: Sequence[float], batch_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(stop batch, examples scored)`` at the end of each stage: each fraction of the evaluation
    examples rounded up to whole batches, repeats dropped, the last stage the whole set.

    >>> stage_bounds([0.25, 1.0], [32, 32, 32, 32])
    [(1, 32), (4, 128)]
    >>> stage_bounds([0.1, 0.5, 1.0], [8, 8, 4])
    [(1, 8), (2, 16), (3, 20)]
    >>> stage_bounds([0.25, 1.0], [32])
    [(1, 32)]
    """
    total = sum(batch_sizes)
    cumulative = [sum(batch_sizes[: i + 1]) for i in range(len(batch_sizes))]
    stops: list[int] = []
    for fraction in fractions:
        stop = next(i + 1 for i, n in enumerate(cumulative) if n >= min(total, math.ceil(fraction * total)))
        if not stops or stop > stops[-1]:
            stops.append(stop)
    if not stops or stops[-1] != len(batch_sizes):
        stops.append(len(batch_sizes))
    return [(stop, cumulative[stop - 1]) for stop in stops]
