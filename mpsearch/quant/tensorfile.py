"""Writing safetensors files one tensor at a time.

``safetensors.torch.save_file`` copies every tensor into Python bytes before it writes, so a file
costs its whole size in memory a second time: for a model's candidate bank or export, the model
over again. :func:`save_tensors` writes the same file (the same tensor order, offsets and bytes;
only the order of the metadata's keys may differ, which the format leaves free; a test compares
the two) with one tensor's bytes in flight at a time, atomically (a temporary file renamed into
place).

>>> import tempfile, pathlib
>>> from safetensors.torch import load_file
>>> path = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
>>> save_tensors({"a": torch.arange(3, dtype=torch.int32), "b": torch.ones(2, dtype=torch.bfloat16)}, path, {"k": "v"})
>>> sorted((k, v.tolist()) for k, v in load_file(path).items())
[('a', [0, 1, 2]), ('b', [1.0, 1.0])]
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` as a safetensors file, streaming; see the module docstring."""
    path = Path(path)
    # The order safetensors itself writes: larger dtypes first (so every tensor stays aligned), then by name.
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors does not store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for name in order:
                t = tensors[name].detach().to("cpu").contiguous()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
