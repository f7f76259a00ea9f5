"""The pruners' rules, on studies whose staged losses are known."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mpsearch.search.pruner import PRUNERS, ForecastPruner, RacePruner

STEP = 32  # the first stage's examples


def study_of(pairs):
    """A study of complete trials, each ``(running loss after the first stage, full loss)``."""
    study = optuna.create_study()
    for running, full in pairs:
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=full, params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)}, intermediate_values={STEP: running}))
    return study


def running_at(value: float):
    return create_trial(state=TrialState.RUNNING, params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)}, intermediate_values={STEP: value})


@pytest.fixture
def regressed():
    """Complete trials whose full loss is 0.25 × running + 0.03, ± 0.0005 (near a well-searched
    best the plans differ less than the examples of a quarter-set stage do); among them 4 that
    were lucky on the stage (running 0.030, full an ordinary 0.0385) and the best (running 0.036,
    full 0.0380)."""
    running = np.linspace(0.034, 0.046, 31)
    full = 0.25 * running + 0.03 + 0.0005 * (-1.0) ** np.arange(31)
    running = np.concatenate([running, [0.030] * 4, [0.036]])
    full = np.concatenate([full, [0.0385] * 4, [0.0380]])
    return study_of(zip(running, full)), running, full


def test_the_forecast_keeps_a_plan_the_stage_cannot_tell_from_the_best_that_the_race_stops(regressed):
    """Running 0.032 is behind the 4 lucky trials, so the race stops it; by the line the losses
    follow its full loss is 0.038, the best's; the fitted line forecasts 0.0384, 0.7 of its error
    above the best: the forecast keeps it."""
    study, _, full = regressed
    assert 0.25 * 0.032 + 0.03 == pytest.approx(full.min())
    assert RacePruner().prune(study, running_at(0.032))
    assert not ForecastPruner().prune(study, running_at(0.032))


def test_the_forecast_stops_a_plan_clearly_worse_and_any_nonfinite_one(regressed):
    study, running, _ = regressed
    assert ForecastPruner().prune(study, running_at(0.040))  # forecast 0.0400, 3.7 errors above the best
    assert ForecastPruner().prune(study, running_at(running.max() + 0.01))
    assert ForecastPruner().prune(study, running_at(float("nan")))
    assert not ForecastPruner().prune(study, running_at(running.min() - 0.004))


def test_the_forecast_prunes_nothing_before_its_warmup():
    study = study_of([(0.04, 0.04), (0.05, 0.05), (0.06, 0.06)])
    assert not ForecastPruner(warmup=8).prune(study, running_at(1.0))
    assert "forecast" in PRUNERS.names()
