"""The allocators against brute force, the repair's guarantees, and the ILP's speed at 200 layers."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from mpsearch.errors import BudgetError
from mpsearch.search.allocate import Costs, greedy, ilp, is_maximal, relinearised, repair

MENU = (2, 3, 4, 8, 16)


def random_costs(layers: int, seed: int) -> Costs:
    """Layers of random sizes with the byte ledger's shape (codes + fp16 scales per 128) and
    convex, decreasing costs, like a sensitivity profile's."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 64, size=layers) * 4096
    nbytes = np.stack([np.ceil(n * b / 8) + (0 if b == 16 else n // 128 * 2) for b in MENU], axis=1).astype(np.int64)
    scale = rng.lognormal(0, 2, size=(layers, 1))
    cost = scale * np.array([4.0 ** -(b - 2) if b < 16 else 0.0 for b in MENU])[None, :] * rng.uniform(0.5, 2, size=(layers, 1))
    return Costs(tuple(f"l{i}" for i in range(layers)), MENU, nbytes, cost, other_bytes=1000)


def brute_force(costs: Costs, budget: int) -> float:
    best = np.inf
    for index in itertools.product(range(len(MENU)), repeat=len(costs.names)):
        index = np.array(index)
        if costs.bytes_of(index) <= budget:
            best = min(best, costs.cost_of(index))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_ilp_is_exact_and_greedy_and_repair_are_feasible_and_maximal(seed):
    costs = random_costs(5, seed)
    low, high = costs.bytes_of(np.zeros(5, dtype=int)), costs.bytes_of(np.full(5, 4))
    budget = int(low + (high - low) * np.random.default_rng(seed).uniform(0.1, 0.6))
    optimum = brute_force(costs, budget)
    exact = ilp(costs, budget)
    assert costs.bytes_of(exact) <= budget
    assert costs.cost_of(exact) == pytest.approx(optimum, rel=1e-9, abs=1e-12)
    assert is_maximal(costs, exact, budget)
    g = greedy(costs, budget)
    assert costs.bytes_of(g) <= budget and is_maximal(costs, g, budget)
    assert costs.cost_of(g) >= optimum - 1e-12
    for start in (np.full(5, 4), np.zeros(5, dtype=int), np.array([4, 0, 3, 1, 2])):
        fixed = repair(costs, start, budget)
        assert costs.bytes_of(fixed) <= budget and is_maximal(costs, fixed, budget)


def test_repair_lowers_the_cheapest_loss_per_byte_first_and_is_deterministic():
    # Two equal layers; layer a is far more sensitive, so over budget it is b that goes down.
    nbytes = np.array([[100, 150, 200, 400, 800]] * 2, dtype=np.int64)
    cost = np.array([[100.0, 10.0, 1.0, 0.1, 0.0], [1.0, 0.1, 0.01, 0.001, 0.0]])
    costs = Costs(("a", "b"), MENU, nbytes, cost, other_bytes=0)
    fixed = repair(costs, {"a": 16, "b": 16}, budget=1000)
    assert fixed.bits() == {"a": 16, "b": 4}
    assert repair(costs, {"a": 16, "b": 16}, budget=1000) == fixed
    # With room left, the raise that gains the most per byte goes first, until nothing fits.
    assert repair(costs, {"a": 2, "b": 2}, budget=650).bits() == {"a": 8, "b": 4}


def test_an_impossible_budget_names_the_smallest_plan():
    costs = random_costs(4, 0)
    with pytest.raises(BudgetError, match="below the smallest plan"):
        repair(costs, np.zeros(4, dtype=int), costs.bytes_of(np.zeros(4, dtype=int)) - 1)


def test_costs_are_made_monotone_in_bits(minilm_workload):
    table = minilm_workload.layer_table()
    noisy = {n: {2: 1.0, 3: 0.5, 4: 0.6, 8: -0.01, 16: 0.0} for n in table.names}  # Δloss can wobble
    costs = Costs.of(table, noisy)
    assert (np.diff(costs.cost, axis=1) <= 0).all() and (costs.cost >= 0).all()
    assert costs.cost[0].tolist() == [1.0, 0.6, 0.6, 0.0, 0.0]
    assert costs.bytes_of(costs.index(table.uniform(4))) == table.bytes(table.uniform(4))


def test_the_ilp_solves_200_layers_by_5_widths_in_under_a_second():
    costs = random_costs(200, 7)
    low, high = costs.bytes_of(np.zeros(200, dtype=int)), costs.bytes_of(np.full(200, 4))
    budget = int(low + 0.3 * (high - low))
    ilp(costs, budget)  # warm up scipy/HiGHS imports
    times = []
    for _ in range(3):
        start = time.perf_counter()
        plan = ilp(costs, budget)
        times.append(time.perf_counter() - start)
    assert costs.bytes_of(plan) <= budget
    assert sorted(times)[1] < 1.0, times


@pytest.mark.parametrize("seed", range(4))
def test_the_relinearised_ilp_is_exact_on_the_local_costs_around_a_plan(seed):
    """Around a plan, each layer may stay or move one step; the measured changes (up: a gain,
    down: a loss, with noise) are the costs. The result is the brute-force best of the 3⁶
    neighbour combinations that fit, then filled (a fill is free: no gain is assumed above the
    measured step)."""
    costs = random_costs(6, seed)
    rng = np.random.default_rng(seed)
    low, high = costs.bytes_of(np.zeros(6, dtype=int)), costs.bytes_of(np.full(6, 4))
    budget = int(low + (high - low) * rng.uniform(0.2, 0.5))
    index = costs.index(ilp(costs, budget))
    down = np.where(index > 0, rng.uniform(0, 1, 6), np.nan)
    up = np.where(index < 4, -rng.uniform(0, 1, 6), np.nan)
    gain = lambda choice: sum({-1: down[i], 0: 0.0, 1: up[i]}[int(c)] for i, c in enumerate(choice))  # noqa: E731
    best = min(
        (gain(steps) for steps in itertools.product((-1, 0, 1), repeat=6)
         if all(0 <= index[i] + s <= 4 for i, s in enumerate(steps)) and costs.bytes_of(index + np.array(steps)) <= budget),
    )
    result = costs.index(relinearised(costs, costs.plan(index), down, up, budget))
    assert costs.bytes_of(result) <= budget and is_maximal(costs, result, budget)
    assert (result >= index - 1).all()
    assert gain(np.clip(result - index, -1, 1)) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_equal_byte_widths_of_other_codes_are_free_steps_up():
    """compressed-tensors' asymmetric layers cost a byte a code at 2, 4 and 8 bits alike: fill and
    greedy take the better codes for nothing (steps used to skip every width of equal bytes, as
    if it stood for the same candidate, and left greedy at 2 bits)."""
    nbytes = np.array([[10, 10, 10, 20], [10, 10, 10, 20]], dtype=np.int64)
    cost = np.array([[3.0, 2.0, 1.0, 0.0], [5.0, 1.0, 0.5, 0.0]])
    costs = Costs(("a", "b"), (2, 4, 8, 16), nbytes, cost, 0)
    down, up = costs.steps
    assert up[0].tolist() == [1, 2, 3, 3] and down[0].tolist() == [0, 1, 2, 2]  # down must make room: only 16 has a step down
    assert greedy(costs, 20).bits() == {"a": 8, "b": 8}
    assert greedy(costs, 30).bits() == {"a": 16, "b": 8}  # the one raise that costs bytes goes where it gains most
    assert not is_maximal(costs, {"a": 2, "b": 8}, 20) and is_maximal(costs, {"a": 8, "b": 8}, 20)
