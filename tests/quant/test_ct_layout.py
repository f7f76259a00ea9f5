"""compressed-tensors' layout as a ledger: which layers the ``compressed-tensors`` target packs,
and the bytes it counts for them (the export checks them against the written file, see
tests/export/test_compressed_tensors.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mpsearch.errors import SpecError
from mpsearch.quant import LayerTable, Scheme
from mpsearch.quant.ct_layout import layer_bytes


def table(model: nn.Module, scheme: Scheme = Scheme()) -> LayerTable:
    return LayerTable.from_model(model, scheme, target="compressed-tensors")


def test_bytes_are_int32_words_model_dtype_scales_and_the_shape():
    t = table(nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 256)))
    # 4 bits: 64 rows of 256·4/32 = 32 words, 2 float32 scales a row, weight_shape (two int64).
    assert t.layer_bytes("0", 4) == 4 * 64 * 32 + 64 * 2 * 4 + 16 == 8720
    # 3 bits pack densely across word boundaries: ceil(64·3/32) = 6 words a row of 64 (one group).
    assert t.layer_bytes("2", 3) == 4 * 256 * 6 + 256 * 4 + 16
    assert t.layer_bytes("0", 16) == 2 * 256 * 64  # fp16, dense
    assert t.bytes(t.uniform(4)) == t.quantized_bytes(t.uniform(4)) + t.other_bytes
    # mpsearch's own file counts fp16 scales and no shape: the ledgers differ, and only by that.
    ours = LayerTable.from_model(nn.Sequential(nn.Linear(256, 64)), Scheme())
    assert ours.layer_bytes("0", 4) == 8720 - 64 * 2 * 2 - 16


def test_scales_take_the_models_dtype():
    half = table(nn.Sequential(nn.Linear(256, 64)).to(torch.bfloat16))
    assert half.dtype_bytes == 2 and half.layer_bytes("0", 4) == 4 * 64 * 32 + 64 * 2 * 2 + 16


def test_asymmetric_codes_are_one_int8_each_with_int8_zero_points():
    t = table(nn.Sequential(nn.Linear(256, 64)), Scheme(symmetric=False))
    assert t.layer_bytes("0", 2) == 64 * 256 + 64 * 2 * (4 + 1)
    assert layer_bytes(rows=64, cols=256, bits=3, group_size=128, symmetric=False, scale_bytes=4) == t.layer_bytes("0", 3)


def test_layers_compressed_tensors_cannot_pack_are_left_out_with_the_reason():
    model = nn.Sequential(nn.Linear(256, 64), nn.Conv1d(64, 8, 3), nn.Linear(200, 16))
    t = table(model)  # group 128, ragged "pad": 200 columns are not equal groups
    assert t.names == ["0"]
    reasons = {e["name"]: e["reason"] for e in t.excluded}
    assert "not Conv1d" in reasons["1"] and "does not divide its 200 columns" in reasons["2"]
    # One group a row (ragged per-channel) is equal groups: packed.
    per_channel = table(model, Scheme(ragged="per-channel"))
    assert per_channel.names == ["0", "2"]
    assert per_channel.layer_bytes("2", 4) == 4 * 16 * math.ceil(200 * 4 / 32) + 16 * 4 + 16
    with pytest.raises(SpecError, match="no quantizable layer"):
        table(nn.Sequential(nn.Conv1d(4, 8, 3)))
