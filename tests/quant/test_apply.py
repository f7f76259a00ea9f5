"""Plans put into models through the candidate bank, and the packed tensors an export writes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.quant import CandidateBank, LayerTable, Scheme, packed_tensors, quantize_rtn, unpack, weight_matrix


def mixed_plan(table: LayerTable) -> dict[str, int]:
    return {name: table.menu[i % len(table.menu)] for i, name in enumerate(table.names)}


@pytest.mark.parametrize("symmetric", [True, False])
def test_bytes_of_a_plan_equal_the_bytes_of_the_tensors_an_export_writes(minilm_workload, symmetric):
    model = minilm_workload.fp_model()
    table = LayerTable.from_model(model, Scheme(group_size=128, symmetric=symmetric))
    bank = CandidateBank.build(model, table)
    for plan in (mixed_plan(table), table.uniform(3), table.uniform(16)):
        tensors = packed_tensors(model, bank, plan)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == table.bytes(plan)


def test_bytes_match_on_gpt2_with_tied_weights_and_ragged_layers(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    for scheme, embeddings in ((Scheme(group_size=48), False), (Scheme(group_size=48, symmetric=False), True)):
        table = LayerTable.from_model(gpt2, scheme, embeddings=embeddings)
        assert any(layer.rule for layer in table.layers)  # 64 inputs do not divide 48
        plan = mixed_plan(table)
        tensors = packed_tensors(gpt2, CandidateBank.build(gpt2, table), plan)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == table.bytes(plan)
        assert ("lm_head.weight" in tensors) is False  # the tied weight is stored once


def test_packed_codes_decode_to_the_weights_a_plan_swaps_in(minilm_workload):
    model = minilm_workload.fp_model()
    table = minilm_workload.layer_table()
    assert table.scheme.method == "gptq" and table.scheme.symmetric
    plan = mixed_plan(table)
    bank = minilm_workload.candidate_bank()
    tensors = packed_tensors(model, bank, plan)
    fake = bank.apply(minilm_workload.build_model(), plan)
    fake_modules, fp_modules = dict(fake.named_modules()), dict(model.named_modules())
    for layer in table.layers:
        bits, w_fake = plan[layer.name], weight_matrix(fake_modules[layer.name])
        if bits == 16:
            assert torch.equal(tensors[f"{layer.name}.weight"].float(), w_fake)
            continue
        codes = unpack(tensors[f"{layer.name}.qweight"], bits, layer.n).reshape(layer.rows, layer.cols)
        scales = tensors[f"{layer.name}.scales"].float().repeat_interleave(layer.group_size, dim=1)[:, : layer.cols]
        decoded = scales * (codes.float() - 2 ** (bits - 1))  # the symmetric formula from rtn's docstring; gptq shares it
        assert torch.equal(decoded, w_fake), layer.name
        assert not torch.equal(w_fake, weight_matrix(fp_modules[layer.name]))


def test_a_plan_keeps_gpt2_conv1d_layout_and_tied_weights(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    table = LayerTable.from_model(gpt2, Scheme(group_size=32), embeddings=True)
    before = gpt2.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in=64, out=192)
    embedding = gpt2.transformer.wte.weight.detach().clone()
    CandidateBank.build(gpt2, table).apply(gpt2, table.uniform(4))
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # still one tensor, quantized once
    assert torch.equal(gpt2.lm_head.weight, quantize_rtn(embedding, 4, 32).dequantize())
    after = gpt2.transformer.h[0].attn.c_attn.weight
    assert after.shape == before.shape
    expected = quantize_rtn(before.t(), 4, 32).dequantize().t()
    assert torch.equal(after, expected)


def test_sixteen_bits_is_the_fp16_rounding_of_the_weight():
    model = nn.Sequential(nn.Linear(16, 8))
    w = model[0].weight.detach().clone()
    table = LayerTable.from_model(model, Scheme(group_size=8))
    CandidateBank.build(model, table).apply(model, {"0": 16})
    assert torch.equal(model[0].weight, w.half().float())
