"""Layer discovery and the byte ledger, on the real MiniLM and on small models of every kind."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mpsearch.errors import BudgetError, SpecError
from mpsearch.quant import Budget, LayerTable, Scheme, weight_matrix
from mpsearch.quant.layers import EMBEDDING_RULE

MINILM_LINEAR_WEIGHTS = 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384


def every_linear(workload) -> LayerTable:
    """MiniLM's table as discovery finds it, the pooler included (the workload's own table leaves
    the pooler out: the default loss cannot see it, see tests/workload/test_reach.py)."""
    s = workload.spec
    return LayerTable.from_model(workload.fp_model(), s.scheme, menu=s.quant.bits)


def state_dict_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def test_minilm_has_37_linear_layers_with_their_true_sizes(minilm_workload):
    model = minilm_workload.fp_model()
    table = every_linear(minilm_workload)
    assert len(table.layers) == 37
    assert {layer.kind for layer in table.layers} == {"Linear"}
    assert table.names[-1] == "pooler.dense"
    modules = dict(model.named_modules())
    for layer in table.layers:
        assert tuple(modules[layer.name].weight.shape) == layer.shape
        assert layer.n == modules[layer.name].weight.numel()
    assert table.n_weights == MINILM_LINEAR_WEIGHTS == 10_764_288
    # Everything that is not a quantized weight: embeddings, biases, norms, at fp32.
    assert table.other_bytes == state_dict_bytes(model) - 4 * MINILM_LINEAR_WEIGHTS


def test_bytes_follow_the_definitions_on_minilm(minilm_workload):
    table = every_linear(minilm_workload)
    query = table.layer("encoder.layer.0.attention.self.query")  # 384 x 384
    assert query.bytes(16, table.scheme) == 2 * 147456
    assert query.bytes(4, table.scheme) == 147456 // 2 + 384 * 3 * 2
    assert query.bytes(3, table.scheme) == math.ceil(147456 * 3 / 8) + 384 * 3 * 2
    assert table.bpw(table.uniform(4)) == 4.125  # DESIGN.md's worked example
    assert table.bpw(table.uniform(16)) == 16.0
    assert table.bytes(table.uniform(16)) == table.other_bytes + 2 * MINILM_LINEAR_WEIGHTS
    plan = {name: (2 if i % 2 else 8) for i, name in enumerate(table.names)}
    assert table.bytes(plan) == table.other_bytes + sum(table.layer_bytes(n, b) for n, b in plan.items())


def test_asymmetric_scheme_adds_one_uint8_zero_point_per_group():
    model = nn.Linear(256, 32, bias=False)
    sym = LayerTable.from_model(model, Scheme(group_size=64))
    asym = LayerTable.from_model(model, Scheme(group_size=64, symmetric=False))
    groups = 32 * 4
    assert asym.bytes({"": 4}) - sym.bytes({"": 4}) == groups
    assert asym.bytes({"": 16}) == sym.bytes({"": 16}) == 2 * 256 * 32
    bf16 = LayerTable.from_model(model, Scheme(group_size=64, scale_dtype="bfloat16"))
    assert bf16.bytes({"": 2}) == sym.bytes({"": 2})  # both scale dtypes are two bytes


def test_per_channel_has_one_scale_per_output():
    table = LayerTable.from_model(nn.Linear(300, 20), Scheme(group_size=-1))
    assert table.layers[0].rule is None
    assert table.layer_bytes("", 8) == 300 * 20 + 20 * 2


def test_conv_and_gpt2_conv1d_are_seen_as_outputs_by_inputs(tiny_gpt2_dir):
    conv = nn.Conv2d(3, 16, kernel_size=3)
    assert weight_matrix(conv).shape == (16, 27)
    table = LayerTable.from_model(nn.Sequential(conv, nn.Conv1d(16, 8, 4)), Scheme(group_size=-1))
    assert [(layer.kind, layer.rows, layer.cols) for layer in table.layers] == [("Conv2d", 16, 27), ("Conv1d", 8, 64)]

    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    table = LayerTable.from_model(gpt2, Scheme(group_size=32))
    c_attn = table.layer("transformer.h.0.attn.c_attn")
    assert c_attn.kind == "Conv1D"
    assert c_attn.shape == (64, 192) and (c_attn.rows, c_attn.cols) == (192, 64)
    assert torch.equal(weight_matrix(gpt2.transformer.h[0].attn.c_attn), gpt2.transformer.h[0].attn.c_attn.weight.t())


def test_tied_weights_count_once_and_an_embedding_tie_is_reported(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight

    table = LayerTable.from_model(gpt2, Scheme(group_size=32))
    assert [layer.kind for layer in table.layers] == ["Conv1D"] * 8
    assert table.excluded == [
        {"name": "lm_head", "reason": "weight tied to Embedding 'transformer.wte'; set layers.embeddings = true to quantize it"},
        {"name": "transformer.wte", "reason": EMBEDDING_RULE},
        {"name": "transformer.wpe", "reason": EMBEDDING_RULE},
    ]
    assert table.bytes(table.uniform(16)) == state_dict_bytes(gpt2) - 2 * table.n_weights

    with_embeddings = LayerTable.from_model(gpt2, Scheme(group_size=32), embeddings=True)
    wte = with_embeddings.layer("transformer.wte")
    assert wte.aliases == ("lm_head",) and wte.kind == "Embedding+Linear"
    assert with_embeddings.n_weights == table.n_weights + gpt2.transformer.wte.weight.numel() + gpt2.transformer.wpe.weight.numel()
    assert with_embeddings.excluded == []


@pytest.mark.parametrize(
    "ragged, group, rule",
    [
        ("pad", 128, "pad: input dim 200 is not a multiple of group 128; the last group of each row holds 72"),
        ("per-channel", 200, "per-channel: input dim 200 is not a multiple of group 128"),
    ],
)
def test_a_shape_that_does_not_divide_the_group_follows_the_stated_rule(ragged, group, rule):
    table = LayerTable.from_model(nn.Sequential(nn.Linear(200, 10), nn.Linear(10, 4)), Scheme(group_size=128, ragged=ragged))
    ragged_layer, small = table.layers
    assert (ragged_layer.group_size, ragged_layer.rule) == (group, rule)
    assert ragged_layer.bytes(4, table.scheme) == 1000 + ragged_layer.n_groups * 2
    assert (small.group_size, small.rule) == (10, "per-channel: input dim 10 is smaller than group 128")
    listed = {row["name"]: row.get("rule") for row in table.to_json()["layers"]}
    assert listed == {"0": rule, "1": small.rule}


def test_patterns_select_layers_and_what_they_leave_out_is_listed(minilm_workload):
    model = minilm_workload.fp_model()
    table = LayerTable.from_model(model, Scheme(), include=["encoder.layer.*.attention.*", "re:intermediate"], exclude=["*.value"])
    assert len(table.layers) == 6 * 3 + 6
    reasons = {item["name"]: item["reason"] for item in table.excluded}
    assert reasons["encoder.layer.3.attention.self.value"] == "matches layers.exclude pattern '*.value'"
    assert reasons["pooler.dense"] == "matches no layers.include pattern"
    assert len(table.layers) + len(table.excluded) == 37 + 3  # the 3 embeddings are listed too
    assert [item["name"] for item in table.excluded if item["reason"] == EMBEDDING_RULE] == [
        "embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"]


def test_an_include_pattern_that_matches_nothing_is_an_error(minilm_workload):
    with pytest.raises(SpecError, match=r"^layers.include: pattern 'decoder.\*' matches no quantizable layer"):
        LayerTable.from_model(minilm_workload.fp_model(), Scheme(), include=["encoder.*", "decoder.*"])


def test_budgets_convert_to_bytes_and_impossible_ones_are_refused(minilm_workload):
    table = every_linear(minilm_workload)
    assert table.budget_bytes(Budget("bpw", 4.0)) == table.other_bytes + MINILM_LINEAR_WEIGHTS // 2
    assert table.budget_bytes(Budget("mib", 50.5)) == int(50.5 * 2**20)
    assert table.budget_bytes(Budget("bytes", 60e6)) == 60_000_000
    smallest, largest = table.bytes(table.uniform(2)), table.bytes(table.uniform(16))
    assert table.budget_bytes(Budget("bytes", smallest)) == smallest
    with pytest.raises(BudgetError, match=r"^budget.bpw: 1.5bpw .* is below the smallest plan, all 2-bit"):
        table.budget_bytes(Budget("bpw", 1.5))
    with pytest.raises(BudgetError, match=r"^budget.bytes: .* is below the smallest plan"):
        table.budget_bytes(Budget("bytes", smallest - 1))
    with pytest.raises(BudgetError, match=r"^budget.mib: 100MiB .* is above the largest plan, all 16-bit"):
        table.budget_bytes(Budget("mib", 100))


def test_plans_must_name_every_layer_with_a_bit_width_from_the_menu():
    table = LayerTable.from_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), Scheme(), menu=(4, 8))
    with pytest.raises(Exception, match="missing"):
        table.bytes({"0": 4})
    with pytest.raises(Exception, match="not in the bit menu"):
        table.bytes({"0": 4, "1": 2})
