"""The streaming safetensors writer against safetensors' own."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from mpsearch.quant.tensorfile import save_tensors


def header(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


def test_the_file_is_the_one_safetensors_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.qweight": torch.randint(0, 255, (1001,), dtype=torch.uint8, generator=g),
        "w.scales": torch.randn(8, 3, generator=g).half(),
        "b": torch.randn(5, generator=g),
        "e": torch.randn(4, 4, generator=g).bfloat16(),
        "i": torch.arange(7),
        "empty": torch.zeros(0),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
    }
    for metadata in ({"format": "mpsearch-packed"}, {"format": "x", "layers": "[]", "k": "v"}):
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata=metadata)
        save_tensors(tensors, tmp_path / "ours.safetensors", metadata)
        theirs, ours = (tmp_path / "theirs.safetensors").read_bytes(), (tmp_path / "ours.safetensors").read_bytes()
        assert header(ours) == header(theirs) and len(ours) == len(theirs)
        assert ours[-sum(t.numel() * t.element_size() for t in tensors.values()) :] == theirs[-sum(t.numel() * t.element_size() for t in tensors.values()) :]
        if len(metadata) == 1:
            assert ours == theirs  # byte for byte when the metadata has no order to differ in
        loaded = load_file(tmp_path / "ours.safetensors")
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "theirs.safetensors"]  # no temporary file left
