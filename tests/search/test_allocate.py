"""The allocators against brute force, the repair's guarantees, and the ILP's speed at 200 layers."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from mpsearch.errors import BudgetError
from mpsearch.search.allocate import Costs, greedy, ilp, is_maximal, relinearised, repair, single_switches

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


def test_single_switches_move_one_layer_one_step_and_leave_out_the_ends_of_the_menu():
    """From a plan with layers at the lowest, a middle and the highest width: every layer that can
    step down or up appears once for each, moved alone to its neighbour, down first; none at the
    ends of the menu steps past them."""
    costs = random_costs(3, 0)
    index = np.array([0, 2, 4])
    moves = single_switches(costs, costs.plan(index))
    assert [(i, step) for i, step, _ in moves] == [(0, 1), (1, -1), (1, 1), (2, -1)]
    for i, step, moved in moves:
        changed = np.flatnonzero(moved != index)
        assert changed.tolist() == [i] and moved[i] == index[i] + step


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


def test_scheme_options_are_menu_entries_of_their_own_through_costs_ilp_and_plans():
    """A menu of bits and scheme options (group sizes, asymmetric): exact bytes from the ledger,
    the ILP exact against brute force over it, and plans that carry each layer's scheme."""
    from torch import nn

    from mpsearch.plan import LayerChoice, Plan
    from mpsearch.quant.layers import LayerTable
    from mpsearch.quant.scheme import Scheme

    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 256), nn.Linear(256, 128))
    menu = (2, "2g32", "2g128a", 3, "3g64", 4, 16)
    table = LayerTable.from_model(model, Scheme(group_size=128), menu=menu)
    assert table.menu == (2, "2g128a", "2g32", 3, "3g64", 4, 16)  # by bits, then by overhead
    first = table.layers[0]  # 64 × 256
    assert table.layer_bytes(first.name, "2g32") == 64 * 256 * 2 // 8 + 64 * 8 * 2
    assert table.layer_bytes(first.name, "2g128a") == 64 * 256 * 2 // 8 + 64 * 2 * 3
    assert table.layer_bytes("1", "2g32") == 256 * 64 * 2 // 8 + 256 * 2 * 2  # 64 inputs: 2 groups of 32, where plain 2 bits has 1 of 64

    rng = np.random.default_rng(0)
    scores = {n: {str(w): float(c) for w, c in zip(table.menu, sorted(rng.uniform(0, 1, len(table.menu)) * [1, 1, 1, 1, 1, 1, 0], reverse=True))} for n in table.names}
    costs = Costs.of(table, scores)
    low, high = costs.bytes_of(np.zeros(3, dtype=int)), costs.bytes_of(np.full(3, len(table.menu) - 2))
    for fraction in (0.1, 0.3, 0.6):
        budget = int(low + (high - low) * fraction)
        best = min(
            costs.cost_of(np.array(i)) for i in itertools.product(range(len(table.menu)), repeat=3) if costs.bytes_of(np.array(i)) <= budget
        )
        plan = ilp(costs, budget)
        assert costs.cost_of(plan) == pytest.approx(best, rel=1e-9, abs=1e-12) and table.bytes(plan) == costs.bytes_of(plan) <= budget

    plan = costs.plan(np.array([1, 2, 4]))
    assert plan.to_json()["layers"] == {
        "0": {"bits": 2, "group_size": 128, "symmetric": False}, "1": {"bits": 2, "group_size": 32}, "2": {"bits": 3, "group_size": 64},
    }
    assert list(costs.index(plan)) == [1, 2, 4] and table.check_plan(plan) == {"0": "2g128a", "1": "2g32", "2": "3g64"}
    # A plan with every field written out (as plan.json holds it) reads back as the same entries.
    resolved = Plan(layers={
        "0": LayerChoice(bits=2, group_size=128, symmetric=False, method="rtn"),
        "1": LayerChoice(bits=3, group_size=64, symmetric=True, method="rtn"),  # 64 inputs: plain 3 bits is one group of 64 already
        "2": LayerChoice(bits=16, method="fp16"),
    })
    assert table.check_plan(resolved) == {"0": "2g128a", "1": 3, "2": 16}
    # For that layer "3g64" is the very candidate of plain 3 bits: one entry, one cost, and plans hold 3.
    assert "3g64" not in table.levels("1") and table.layer_level("1", "3g64") == 3
    assert costs.plan(np.array([4, 4, 4])).bits() == {"0": 3, "1": 3, "2": 3} and table.check_plan(costs.plan(np.array([4, 4, 4])))["1"] == 3
    assert list(costs.index(resolved)) == [1, 3, 6]
    with pytest.raises(Exception, match="not in the bit menu"):
        table.check_plan(Plan.of_bits({"0": "4g32", "1": 4, "2": 4}))
