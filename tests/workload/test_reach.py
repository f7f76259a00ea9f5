"""Layers the loss cannot see, found by one forward and backward pass on the real models."""

from __future__ import annotations

import torch

from mpsearch.quant.layers import UNSEEN_RULE
from mpsearch.workload.reach import unseen_layers
from mpsearch.workload import Workload


def test_the_mean_pooled_loss_cannot_see_minilm_s_pooler_and_the_table_leaves_it_out(minilm_workload):
    table = minilm_workload.layer_table()
    assert table.unseen == ("pooler.dense",)
    assert "pooler.dense" not in table.names and len(table.names) == 36
    assert {"name": "pooler.dense", "reason": UNSEEN_RULE} in table.excluded
    # Left out, it is one of the other tensors at the model's dtype: weight and bias in fp32.
    searched = Workload(minilm_workload.spec.with_overrides(layers={"unseen": "search"}), device="cpu").layer_table()
    assert searched.unseen == ("pooler.dense",) and searched.names == [*table.names, "pooler.dense"]
    assert table.other_bytes == searched.other_bytes + 384 * 384 * 4


def test_the_check_leaves_the_model_as_it_found_it(minilm_workload):
    model = minilm_workload.fp_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert unseen_layers(minilm_workload, names) == ["pooler.dense"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_a_causal_lm_s_loss_sees_every_layer(tiny_gpt2_dir):
    from mpsearch.spec import Spec

    spec = Spec.from_toml(f"""
        [model]
        source = "hf:{tiny_gpt2_dir}"
        [data]
        calibration = 4
        evaluation = 4
        max_length = 16
        batch_size = 4
        [loss]
        kind = "causal-lm"
    """)
    table = Workload(spec, device="cpu").layer_table()
    assert table.unseen == () and len(table.names) == 8  # 2 blocks x (c_attn, c_proj, c_fc, mlp.c_proj)


def test_unseen_fp16_keeps_the_pooler_in_every_plan_at_16_bits(minilm_workload):
    """layers.unseen = "fp16": in the plan, at 16 bits whatever the allocator or a sampler asks,
    at 16-bit bytes against the budget; a plan that gives it fewer bits is refused."""
    import numpy as np
    import pytest

    from mpsearch.errors import MPSearchError
    from mpsearch.search.allocate import Costs, ilp
    from mpsearch.spec import Spec

    table = Workload(minilm_workload.spec.with_overrides(layers={"unseen": "fp16"}), device="cpu").layer_table()
    assert table.pinned == ("pooler.dense",) and table.names[-1] == "pooler.dense"
    assert table.levels("pooler.dense") == (16,) and table.uniform(2).bits()["pooler.dense"] == 16
    assert all(table.layer_bytes("pooler.dense", b) == 2 * 384 * 384 for b in table.menu)
    costs = Costs.of(table, None)
    assert costs.plan(np.zeros(len(table.names), dtype=np.int64)).bits()["pooler.dense"] == 16
    assert ilp(costs, table.bytes(table.uniform(2)) + 10_000).bits()["pooler.dense"] == 16
    with pytest.raises(MPSearchError, match="pooler.dense"):
        table.check_plan({**table.uniform(4).bits(), "pooler.dense": 2})
    with pytest.raises(MPSearchError, match="add 16 to quant.bits"):
        Spec.from_toml('[layers]\nunseen = "fp16"\n[quant]\nbits = [2, 4]\n')
