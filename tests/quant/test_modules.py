"""Modules that run from packed weights give the outputs of the fake-quantized layers they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpsearch.quant import CandidateBank, LayerTable, Scheme
from mpsearch.quant.layers import tensor_key
from mpsearch.quant.modules import QuantizedModule, set_decode_cache

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Mixed(nn.Module):
    """One of each layer kind mpsearch quantizes, at group 32: some rows ragged, some shorter than a group."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.embed = nn.Embedding(50, 40, padding_idx=0)
        self.fc = nn.Linear(40, 64)
        self.gpt = Conv1D(48, 64)  # (in, out) = (64, 48)
        self.conv1d = nn.Conv1d(3, 8, kernel_size=5, padding=2, padding_mode="reflect")
        self.conv2d = nn.Conv2d(8, 6, kernel_size=(2, 2), stride=2, groups=2, bias=False)

    def forward(self, ids, signal):
        x = self.gpt(torch.relu(self.fc(self.embed(ids))))
        y = self.conv1d(signal).reshape(signal.shape[0], 8, 4, -1)
        return x.sum(), self.conv2d(y)


def swap(model: nn.Module, table: LayerTable, bank: CandidateBank, plan: dict) -> nn.Module:
    """The model with every planned layer replaced by a QuantizedModule holding the bank's packed tensors."""
    modules = dict(model.named_modules())
    for layer in table.layers:
        bits = plan[layer.name]
        q = QuantizedModule.replacing(modules[layer.name], layer, bits, table.scheme.symmetric, table.scheme.scale_dtype)
        for suffix, t in bank.candidate(layer.name, bits).packed.items():
            getattr(q, suffix).copy_(t)
        setattr(model, layer.name, q)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [(2, 3, 4, 8, 16), (3, 8, 16, 2, 4), (16, 4, 2, 3, 8)])
def test_packed_modules_match_fake_quantization(device, symmetric, bits):
    torch.manual_seed(0)
    model = Mixed().to(device)
    table = LayerTable.from_model(model, Scheme(group_size=32, symmetric=symmetric), embeddings=True)
    assert [layer.name for layer in table.layers] == ["embed", "fc", "gpt", "conv1d", "conv2d"]
    # 40 inputs pad their last group; the convolutions' 15 and 16 are below one group: per-channel.
    assert {layer.name: layer.rule.split(":")[0] for layer in table.layers if layer.rule} == {
        "embed": "pad", "fc": "pad", "conv1d": "per-channel", "conv2d": "per-channel"
    }
    plan = dict(zip(table.names, bits))
    bank = CandidateBank.build(model, table)
    ids = torch.randint(0, 50, (3, 7), device=device)
    signal = torch.randn(2, 3, 16, device=device)
    with torch.no_grad(), bank.applied(model, plan):
        expected = model(ids, signal)
    torch.manual_seed(0)  # the same biases; the weights come from the bank
    packed = swap(Mixed().to(device), table, bank, plan)
    with torch.no_grad():
        got = packed(ids, signal)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # The packed model holds exactly the bytes the ledger charges, plus the tensors it leaves alone.
    held = {tensor_key(t): t.numel() * t.element_size() for t in packed.state_dict(keep_vars=True).values()}
    assert sum(held.values()) == table.bytes(plan)


def test_a_packed_module_decodes_the_candidate_the_bank_swaps_in():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 96))
    table = LayerTable.from_model(model, Scheme(group_size=64))
    bank = CandidateBank.build(model, table)
    for bits in (2, 3, 4, 8, 16):
        q = swap(nn.Sequential(nn.Linear(256, 96)), table, bank, {"0": bits})[0]
        assert torch.equal(q.matrix(), bank.candidate("0", bits).dequantized(table.layer("0")))
        assert ("fp16" if bits == 16 else f"{bits}-bit, group 64") in repr(q)


def test_the_decode_cache_gives_the_same_outputs_and_decodes_once():
    """Opt-in: the decoded weight is kept after the first forward; off, nothing is kept."""
    torch.manual_seed(0)
    model = Mixed()
    table = LayerTable.from_model(model, Scheme(group_size=32), embeddings=True)
    plan = dict(zip(table.names, (2, 3, 4, 8, 16)))
    bank = CandidateBank.build(model, table)
    ids, signal = torch.randint(0, 50, (3, 7)), torch.randn(2, 3, 16)
    torch.manual_seed(0)
    packed = swap(Mixed(), table, bank, plan)
    keys = set(packed.state_dict())
    with torch.no_grad():
        plain = packed(ids, signal)
    modules = [m for m in packed.modules() if isinstance(m, QuantizedModule)]
    assert not any("_decoded" in m.__dict__ for m in modules)
    assert set_decode_cache(packed, True) == len(table.names)
    with torch.no_grad():
        first = packed(ids, signal)
        kept = [m.__dict__["_decoded"] for m in modules]
        second = packed(ids, signal)
    assert all(m.__dict__["_decoded"] is k for m, k in zip(modules, kept))  # decoded once, reused
    for a, b, c in zip(plain, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert set(packed.state_dict()) == keys  # the cache is never saved
    wide = modules[1].decoded(torch.float64)  # another dtype: decoded again, the same values
    assert wide.dtype == torch.float64 and modules[1].__dict__["_decoded"] is wide and torch.equal(wide.float(), kept[1])
    # New buffers make a kept copy stale: loading a state dict or moving the model drops it.
    state = {k: v.clone() for k, v in packed.state_dict().items()}
    scales = next(k for k in state if k.endswith(".scales"))
    state[scales] *= 2
    packed.load_state_dict(state)
    assert not any("_decoded" in m.__dict__ for m in modules)
    with torch.no_grad():
        doubled = packed(ids, signal)
    assert any(not torch.equal(a, b) for a, b in zip(doubled, plain))  # the new scales are used
    packed.to("cpu")
    assert not any("_decoded" in m.__dict__ for m in modules)
    packed(ids, signal)
    set_decode_cache(packed, False)
    assert not any("_decoded" in m.__dict__ for m in modules)
