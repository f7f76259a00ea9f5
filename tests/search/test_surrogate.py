"""The additive loss model fitted to the trials (mpsearch.search.surrogate), and the level-switch
sampler that screens its children by it.

The losses here are made from a known table rather than measured (an interaction the profile cannot
see, planted), so what the fit must recover and the true loss of every proposal are known exactly;
the driver tests run the screened sampler on the real model."""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import IntDistribution

from mpsearch.search.allocate import Costs, repair_index
from mpsearch.search.sampler import LevelSwitchSampler
from mpsearch.search.space import MenuIndexSpace
from mpsearch.search.surrogate import fit_additive
from mpsearch.storage.trials import SAMPLED, SOURCE

LAYERS, MENU = 8, (2, 3, 4, 8, 16)


def costs(layers: int = LAYERS) -> Costs:
    """A profile's costs, falling with the width, and bytes in proportion to the bits."""
    rng = np.random.default_rng(0)
    nbytes = np.array([[1000 * b for b in MENU]] * layers, dtype=np.int64)
    cost = np.sort(rng.uniform(0, 0.01, (layers, len(MENU))), axis=1)[:, ::-1].copy()
    cost[:, -1] = 0.0
    return Costs(tuple(f"l{i}" for i in range(layers)), MENU, nbytes, cost, 0)


def plans(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(MENU), (n, LAYERS))


def test_losses_the_profile_explains_are_fitted_exactly_with_nothing_corrected():
    c = costs()
    index = plans(40, 1)
    losses = 0.02 + 3.0 * c.cost[np.arange(LAYERS), index].sum(axis=1)
    model = fit_additive(c, index, losses)
    assert abs(model.constant - 0.02) < 1e-12
    np.testing.assert_allclose(model.table, 3.0 * c.cost, atol=1e-12)
    np.testing.assert_allclose(model.predict(plans(100, 2)), 0.02 + 3.0 * c.cost[np.arange(LAYERS), plans(100, 2)].sum(axis=1), atol=1e-12)


def test_the_trials_correct_a_layer_the_profile_is_wrong_about():
    """Layer 3 hurts 0.03 more at 2 bits than its profile says (an interaction the profile, measured
    from the FP model, cannot see): the fit learns most of it, and ranks new plans better."""
    c = costs()
    truth = c.cost.copy()
    truth[3, 0] += 0.03
    index = plans(60, 3)
    losses = 0.01 + truth[np.arange(LAYERS), index].sum(axis=1)
    model = fit_additive(c, index, losses)
    assert model.table[3, 0] - model.table[3, 1] > (truth[3, 0] - truth[3, 1]) * 0.8
    fresh = plans(300, 4)
    actual = 0.01 + truth[np.arange(LAYERS), fresh].sum(axis=1)
    fitted = np.abs(model.predict(fresh) - actual).mean()
    profile = np.abs(0.01 + c.cost[np.arange(LAYERS), fresh].sum(axis=1) - actual).mean()
    assert fitted < profile / 2  # measured: 0.0018 against 0.0054


def proposals(screen: int, truth: np.ndarray, c: Costs, budget: int, n: int = 24) -> list[float]:
    """The true losses of ``n`` proposals in a row, each told to the study before the next."""
    layers = len(c.names)
    space = MenuIndexSpace(c, None)
    sampler = LevelSwitchSampler(c, budget, space, seed=0, screen=screen)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rng = np.random.default_rng(1)
    distributions = {name: IntDistribution(0, len(MENU) - 1) for name in c.names}
    for _ in range(40):  # a history of sampled plans around which the screen fits its model
        index = repair_index(c, rng.integers(0, len(MENU), layers), budget)
        study.add_trial(optuna.trial.create_trial(params=space.params_of(index), distributions=distributions,
                                                  values=[float(truth[np.arange(layers), index].sum())], user_attrs={SOURCE: SAMPLED}))
    losses = []
    for _ in range(n):
        index = space.index(sampler.sample_relative(study, None, {}))
        assert c.bytes_of(index) <= budget
        loss = float(truth[np.arange(layers), index].sum())
        study.add_trial(optuna.trial.create_trial(params=space.params_of(index), distributions=distributions, values=[loss], user_attrs={SOURCE: SAMPLED}))
        losses.append(loss)
    return losses


def test_screened_children_avoid_what_the_trials_show_the_profile_gets_wrong():
    c = costs(10)
    truth = c.cost.copy()
    truth[:, :2] += np.random.default_rng(2).uniform(0, 0.02, (10, 2))  # 2 and 3 bits hurt more than the profile says
    budget = c.bytes_of(np.full(10, 2))  # 4 bits on average
    screened, plain = proposals(64, truth, c, budget), proposals(0, truth, c, budget)
    assert len({round(x, 12) for x in screened}) > 1  # not one plan over and over
    # measured: median 0.0648 screened against 0.0792 plain; 0.72x to 0.82x over five plantings
    assert np.median(screened) < 0.85 * np.median(plain)
