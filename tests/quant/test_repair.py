"""Repair on real MiniLM layers: codes never change, zero steps change nothing, and the model is
left without its parametrizations."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from mpsearch.quant.repair import decode_into, repair
from mpsearch.spec import Spec
from mpsearch.workload import Workload

from conftest import DEFAULT_STUDY


@pytest.fixture(scope="module")
def workload() -> Workload:
    spec = Spec.load(DEFAULT_STUDY).with_overrides(
        data={"source": "stdlib-docs", "calibration": 16, "evaluation": 16, "max_length": 48, "batch_size": 8, "seed": 0}, quant={"method": "rtn"}
    )
    return Workload(spec, device="cpu")


def plan_forms(workload):
    table = workload.layer_table()
    bits = {name: (3 if i % 3 else 16) for i, name in enumerate(table.names)}
    bank = workload.candidate_bank(sorted(set(bits.values())))
    return table, bits, {name: {k: t.cpu() for k, t in bank.candidate(name, b).packed.items()} for name, b in bits.items()}


def step_loss(workload):
    def loss(model, index):
        total, count = workload.loss_terms(model, "calibration", index)
        return total / count
    return loss


def test_zero_steps_give_back_the_plan_and_steps_change_scales_only(workload):
    table, bits, forms = plan_forms(workload)
    n = len(workload.calibration_batches())
    model = workload.build_model()
    same = repair(model, table, bits, forms, step_loss(workload), n, steps=0)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for name in table.names:
        assert all(torch.equal(same.forms[name][k], forms[name][k]) for k in forms[name])
    tuned = repair(workload.build_model(), table, bits, forms, step_loss(workload), n, steps=6, lr=1e-2)
    assert len(tuned.curve) == 6
    moved = 0
    for name in table.names:
        assert all(torch.equal(tuned.forms[name][k], forms[name][k]) for k in forms[name] if k != "scales")  # codes fixed
        if bits[name] != 16:
            moved += not torch.equal(tuned.forms[name]["scales"], forms[name]["scales"])
    assert moved == sum(b != 16 for b in bits.values())  # every quantized layer's scales were tuned
    assert any("LayerNorm" in k for k in tuned.tensors) and all(t.dtype == torch.float32 for t in tuned.tensors.values())
    # The tuned forms, decoded into a fresh model, score below the plan on the data they were tuned on.
    before = decode_into(workload.build_model(), table, bits, forms)
    after = decode_into(workload.build_model(), table, bits, tuned.forms)
    after.load_state_dict(tuned.tensors, strict=False)
    assert workload.loss(after, "calibration") < workload.loss(before, "calibration")


def test_a_cosine_schedule_is_seeded_and_tunes_otherwise_than_a_constant_rate(workload):
    """``export.repair_schedule = "cosine"``: the rate decays from ``lr`` over the steps, so the
    same steps end elsewhere than at a constant rate, still below the plan, and the same run
    twice gives the same scales."""
    table, bits, forms = plan_forms(workload)
    n = len(workload.calibration_batches())
    runs = [repair(workload.build_model(), table, bits, forms, step_loss(workload), n, steps=6, lr=1e-2, schedule=s) for s in ("cosine", "cosine", "constant")]
    cosine, again, constant = runs
    quantized = [name for name in table.names if bits[name] != 16]
    assert all(torch.equal(cosine.forms[name]["scales"], again.forms[name]["scales"]) for name in quantized) and cosine.curve == again.curve
    assert cosine.curve[:1] == constant.curve[:1] and cosine.curve[1:] != constant.curve[1:]  # the first step is at lr in both
    assert any(not torch.equal(cosine.forms[name]["scales"], constant.forms[name]["scales"]) for name in quantized)
    before = decode_into(workload.build_model(), table, bits, forms)
    after = decode_into(workload.build_model(), table, bits, cosine.forms)
    after.load_state_dict(cosine.tensors, strict=False)
    assert workload.loss(after, "calibration") < workload.loss(before, "calibration")
