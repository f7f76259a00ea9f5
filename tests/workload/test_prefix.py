"""Partial plans scored from kept FP block outputs: the same loss to the bit, blocks not run."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn

from mpsearch.plan import Plan
from mpsearch.sensitivity.perturbation import perturbation_scores
from mpsearch.spec import Spec
from mpsearch.workload import Workload
from mpsearch.workload.prefix import FpPrefix

from conftest import tiny_study


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return Spec.load(tiny_study(tmp_path_factory.mktemp("prefix"), bits=(3, 8)))


def _scan(spec: Spec, skip: bool, budget: int | None = None):
    workload = Workload(spec, device="cpu")
    prefix = workload.fp_prefix()
    prefix.enabled = skip
    if budget is not None:
        prefix.budget_bytes = budget
    return perturbation_scores(workload, workers=0), workload


def test_a_scan_from_kept_block_outputs_gives_every_score_to_the_bit_and_runs_fewer_blocks(spec):
    full, _ = _scan(spec, skip=False)
    skipped, workload = _scan(spec, skip=True)
    assert skipped == full  # exact: every block that runs is given the very values it would compute
    prefix = workload.fp_prefix()
    blocks = prefix.blocks(workload.fp_model())
    assert len(blocks) == 6 and prefix._points["calibration"] == [1, 2, 3, 4, 5, 6]  # MiniLM's 6 layers all fit
    # Each layer's two plans (3 and 8 bits) skip the blocks before its own on every batch: 6 layers a block.
    assert prefix.skipped_blocks == len(workload.batches("calibration")) * sum(2 * 6 * k for k in range(6))
    # A layer outside every block (the pooler) skips nothing; an empty plan skips them all.
    model = workload.fp_model()
    assert prefix.fp_blocks(model, ["pooler.dense"]) == 0 and prefix.fp_blocks(model, []) == 6
    assert prefix.fp_blocks(model, ["encoder.layer.3.output.dense", "encoder.layer.5.attention.self.query"]) == 3


def test_the_last_block_plan_does_not_run_the_blocks_before_it(spec):
    workload = Workload(spec, device="cpu")
    table = workload.layer_table()
    model = workload.fp_model()
    bank = workload.candidate_bank()
    ran = []
    for name, block in workload.fp_prefix().blocks(model):
        block.attention.register_forward_hook(lambda *_, name=name: ran.append(name))
    last = [n for n in table.names if n.startswith("encoder.layer.5.")][0]
    for plan in (Plan(layers={}), Plan.of_bits({last: 3})):
        ran.clear()
        bank.apply(model, plan, partial=True)
        loss = workload.evaluate(model, "calibration", perplexity=False, quantized=list(plan)).loss
        bank.restore(model)
    batches = len(workload.batches("calibration"))
    # The empty plan ran every block (keeping their outputs); the last layer's plan ran its own
    # block on each batch, and every block once more: its first batch in full, to check the skip.
    assert ran.count("encoder.layer.0") == 1 and ran.count("encoder.layer.5") == batches + 1
    assert loss > 0
    # A whole plan scored next (a search's first trial, after its scan) drops the kept outputs.
    assert workload.fp_prefix()._kept["calibration"]
    workload.evaluate(model, "calibration", perplexity=False)
    assert not workload.fp_prefix()._kept


def test_a_smaller_budget_keeps_fewer_blocks_and_the_scores_stay_exact(spec):
    full, _ = _scan(spec, skip=False)
    workload = Workload(spec, device="cpu")
    batch = workload.batches("calibration")[0]["input_ids"]
    per_block = batch.shape[0] * batch.shape[1] * 384 * 4 * len(workload.batches("calibration"))  # MiniLM: 384 floats a token
    skipped, workload = _scan(spec, skip=True, budget=2 * per_block)
    assert workload.fp_prefix()._points["calibration"] == [2, 4]
    assert skipped == full and 0 < workload.fp_prefix().skipped_blocks < len(workload.batches("calibration")) * sum(2 * 6 * k for k in range(6))


class _Counted(nn.Module):
    """A block whose output depends on how many blocks ran before it: shared state that a kept
    output does not carry, so skipping blocks changes the result."""

    def __init__(self, ran: list):
        super().__init__()
        self.ran, self.linear = ran, nn.Linear(4, 4)

    def forward(self, x):
        self.ran.append(1)
        return self.linear(x) + len(self.ran)


def test_a_model_whose_blocks_share_state_is_caught_on_the_first_skip_and_run_in_full(caplog):
    ran: list = []
    blocks = nn.ModuleList(_Counted(ran) for _ in range(3))
    model = nn.Sequential(*blocks)
    prefix = FpPrefix(lambda m: [(f"{i}", b) for i, b in enumerate(blocks)])
    x = torch.ones(1, 4)

    def run():
        ran.clear()
        return model(x)

    own = blocks[0].forward = functools.partial(_Counted.forward, blocks[0])  # a forward of its own, as accelerate's hooks set
    same = lambda a, b: torch.equal(a, b)
    expected = run()
    assert torch.equal(prefix.forward(model, "calibration", 0, 1, 3, run, same), expected)  # runs all, keeps outputs
    with caplog.at_level(logging.WARNING, logger="mpsearch.workload.prefix"):
        got = prefix.forward(model, "calibration", 0, 1, 2, run, same)
    assert torch.equal(got, expected) and not prefix.enabled and "every block is run from now on" in caplog.text
    assert prefix.skipped_blocks == 0 and blocks[0].__dict__["forward"] is own  # put back after the skip


class _InPlace(nn.Module):
    """A block that scales its input in place before its linear map (legal, if unusual)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x.mul_(2))


def test_a_block_that_changes_its_input_in_place_does_not_change_the_kept_outputs():
    blocks = nn.ModuleList(_InPlace() for _ in range(3))
    model = nn.Sequential(*blocks)
    prefix = FpPrefix(lambda m: [(f"{i}", b) for i, b in enumerate(blocks)])
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    run = lambda: model(x.clone())
    same = lambda a, b: torch.equal(a, b)
    with torch.no_grad():
        expected = run()
        prefix.forward(model, "calibration", 0, 1, 3, run, same)  # keeps every block's output
        repeated = [prefix.forward(model, "calibration", 0, 1, 2, run, same) for _ in range(3)]
    assert prefix.enabled and prefix.skipped_blocks == 6
    assert all(torch.equal(out, expected) for out in repeated)
