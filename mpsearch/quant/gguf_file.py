"""A GGUF file's tensors and scalar metadata, read straight from its header.

The ``gguf`` package's ``GGUFReader`` builds a NumPy view of every part of every field, the
vocabulary's hundreds of thousands of strings included: seconds for a small LLM, more than half a
minute for a large vocabulary. mpsearch needs the tensors (name, ggml type, bytes, data) and a
few scalar fields, so this reader walks the header with :mod:`struct`, steps over arrays without
building them, and maps the tensor data from the file (nothing is read until it is used). The
format's constants (value types, ggml types and their block sizes) come from ``gguf`` itself.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpsearch.errors import MPSearchError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml types that hold plain numbers; every other type is blocks of bytes.
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType: .name is "Q4_K", "F32", ...
    shape: tuple[int, ...]  # ggml's order: the row length first
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # typed for plain types; uint8, one row of blocks a row, for block types


@dataclass(frozen=True)
class GgufFile:
    version: int
    fields: dict[str, Any] = field(default_factory=dict)  # scalar and string fields; arrays are left out
    tensors: dict[str, GgufTensor] = field(default_factory=dict)


def read_gguf(path: Path | str) -> GgufFile:
    """The tensors and scalar fields of the GGUF file at ``path``; a file that is not GGUF, or is
    cut short, is an :class:`MPSearchError` that names the file (not its folder)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise MPSearchError(f"cannot read the GGUF file {path.name} ({getattr(e, 'strerror', None) or e}); check that it exists and is whole") from None
    try:
        return _parse(buffer, path.name)
    except (struct.error, UnicodeDecodeError, IndexError, OverflowError):
        raise MPSearchError(f"the GGUF file {path.name} is cut short or damaged; export it again") from None


def _parse(buffer, name: str) -> GgufFile:
    from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType

    reader = _Header(buffer)
    if len(buffer) < 8 or reader.take("<I") != GGUF_MAGIC:
        raise MPSearchError(f"{name} is not a GGUF file (no GGUF magic at its start); give a .gguf that llama.cpp wrote")
    version = reader.take("<I")
    if version < 2:
        raise MPSearchError(f"{name} is GGUF version {version}, which mpsearch does not read; convert it again with a current llama.cpp")
    n_tensors, n_fields = reader.take("<Q"), reader.take("<Q")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = reader.string()
        kind = reader.take("<I")
        if kind == _ARRAY:
            reader.skip_array()
        else:
            fields[key] = reader.value(kind)
    infos = []
    for _ in range(n_tensors):
        tensor_name = reader.string()
        dims = tuple(reader.take("<Q") for _ in range(reader.take("<I")))
        infos.append((tensor_name, dims, reader.take("<I"), reader.take("<Q")))
    alignment = int(fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    start = -(-reader.at // alignment) * alignment
    tensors: dict[str, GgufTensor] = {}
    for tensor_name, dims, raw_type, offset in infos:
        kind = GGMLQuantizationType(raw_type)
        block, size = GGML_QUANT_SIZES[kind]
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        n_bytes = n_elements // block * size
        at = start + offset
        if at + n_bytes > len(buffer):
            raise MPSearchError(f"the GGUF file {name} is cut short: tensor {tensor_name} ends past its end; export it again")
        plain = _PLAIN.get(kind.name)
        if plain is not None:
            data = np.frombuffer(buffer, dtype=plain, count=n_elements, offset=at).reshape(tuple(reversed(dims)) or (1,))
        else:
            data = np.frombuffer(buffer, dtype=np.uint8, count=n_bytes, offset=at).reshape(n_elements // dims[0], -1)
        tensors[tensor_name] = GgufTensor(tensor_name, kind, dims, n_elements, n_bytes, at, data)
    return GgufFile(version, fields, tensors)


class _Header:
    """A cursor over the header: little-endian numbers, strings (u64 length, UTF-8) and values."""

    def __init__(self, buffer):
        self.buffer, self.at = buffer, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buffer, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.at + n > len(self.buffer):
            raise IndexError("string past the end")
        text = bytes(self.buffer[self.at : self.at + n]).decode("utf-8")
        self.at += n
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise IndexError(f"unknown value type {kind}")
        return self.take(fmt)

    def skip_array(self) -> None:
        kind, n = self.take("<I"), self.take("<Q")
        if kind == _STRING:
            for _ in range(n):
                self.at += 8 + struct.unpack_from("<Q", self.buffer, self.at)[0]
        elif kind == _ARRAY:
            for _ in range(n):
                self.skip_array()
        elif kind in _SCALARS:
            self.at += n * struct.calcsize(_SCALARS[kind])
        else:
            raise IndexError(f"unknown value type {kind}")
        if self.at > len(self.buffer):
            raise IndexError("array past the end")
