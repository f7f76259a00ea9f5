"""Modules that run from packed weights: the memory saving of an export is real in use.

A :class:`QuantizedModule` replaces one quantizable layer of a model. It keeps the layer's
weight as an export stores it (see ``FORMAT.md``) and nothing else:

* at b ∈ {2, 3, 4, 8} bits, buffers ``qweight`` (packed uint8 codes), ``scales`` and, when
  asymmetric, ``zeros``;
* at 16 bits, a buffer ``weight`` in fp16;

plus the layer's own ``bias`` when it has one. Its ``forward`` decodes the weight into the
input's dtype, on the input's device, uses it once and drops it. The decoded values are
exactly those a search evaluated (the same formula, in float32, then cast), so a loaded
model reproduces the fake-quantized one.

The state-dict keys of a model with these modules are the tensor names of the exported
file, so loading is ``load_state_dict``-shaped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.quant.layers import Conv1D, QuantLayer
from mpsearch.quant.packing import packed_nbytes, unpack
from mpsearch.quant.rtn import QuantizedWeight
from mpsearch.quant.scheme import FLOAT_BITS, SCALE_DTYPES

_CONV_ATTRS = ("stride", "padding", "dilation", "groups", "padding_mode", "_reversed_padding_repeated_twice")
_EMBEDDING_ATTRS = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


class QuantizedModule(nn.Module):
    """One layer's weight kept packed, decoded on the fly in ``forward``.

    Build it with :meth:`replacing` from the FP module it stands in for; its buffers are
    allocated (uninitialised) at their exact shapes, to be filled from the exported file.
    """

    def __init__(self, layer: QuantLayer, bits: int, symmetric: bool, scale_dtype: str, module: nn.Module, device: torch.device):
        super().__init__()
        self.layer_name = layer.name
        self.bits = bits
        self.rows, self.cols, self.group_size = layer.rows, layer.cols, layer.group_size
        self.symmetric = symmetric
        self.weight_shape = tuple(layer.shape)
        self.op, self._wrapped = _op(module)
        self.compute_dtype = module.weight.dtype
        for attr in _CONV_ATTRS if self.op == "conv" else _EMBEDDING_ATTRS if self.op == "embedding" else ():
            setattr(self, attr, getattr(module, attr))
        if bits == FLOAT_BITS:
            self.register_buffer("weight", torch.empty(layer.rows, layer.cols, dtype=torch.float16, device=device))
        else:
            groups = (layer.rows, math.ceil(layer.cols / layer.group_size))
            self.register_buffer("qweight", torch.empty(packed_nbytes(layer.n, bits), dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(groups, dtype=SCALE_DTYPES[scale_dtype], device=device))
            if not symmetric:
                self.register_buffer("zeros", torch.empty(groups, dtype=torch.uint8, device=device))
        bias = getattr(module, "bias", None)
        self.bias = bias if isinstance(bias, nn.Parameter) else None

    @classmethod
    def replacing(cls, module: nn.Module, layer: QuantLayer, bits: int, symmetric: bool, scale_dtype: str) -> "QuantizedModule":
        device = module.weight.device
        return cls(layer, bits, symmetric, scale_dtype, module, device)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded (rows × cols) weight matrix in ``dtype``."""
        if self.bits == FLOAT_BITS:
            return self.weight.to(dtype)
        codes = unpack(self.qweight, self.bits, self.rows * self.cols).reshape(self.rows, self.cols)
        q = QuantizedWeight(codes, self.scales, getattr(self, "zeros", None), self.bits, self.group_size)
        return q.dequantize(dtype)

    # Opt-in (see :func:`set_decode_cache`): keep the decoded matrix after its first use. The layer
    # then runs as fast as the FP one, at the FP layer's memory; off, the saving is real in use.
    decode_cache = False

    def decoded(self, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`matrix`, or with ``decode_cache`` on, the one decoded at the first call (again
        after a change of dtype; moving the module or loading new buffers drops it)."""
        cached = self.__dict__.get("_decoded")  # the fast path first: a forward's whole overhead
        if cached is not None and cached.dtype == dtype:
            return cached
        if not self.decode_cache:
            return self.matrix(dtype)
        with torch.no_grad():
            cached = self.matrix(dtype)
        self.__dict__["_decoded"] = cached  # a plain attribute: not in the state dict, never saved
        return cached

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() go through here: a decoded copy of the old buffers would be stale.
        self.__dict__.pop("_decoded", None)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_decoded", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "embedding":  # integer input: decode into the dtype the FP layer had
            return F.embedding(x, self.decoded(self.compute_dtype), *(getattr(self, a) for a in _EMBEDDING_ATTRS))
        w = self.decoded(x.dtype)
        if self.op == "linear":
            return F.linear(x, w, self.bias)
        return self._wrapped._conv_forward(self, x, w.reshape(self.weight_shape), self.bias)

    def extra_repr(self) -> str:
        what = "fp16" if self.bits == FLOAT_BITS else f"{self.bits}-bit, group {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"
        return f"{self.layer_name}: {self.rows}×{self.cols} {self.op}, {what}"


def set_decode_cache(model: nn.Module, on: bool = True) -> int:
    """Turn the decoded-weight cache of every :class:`QuantizedModule` in ``model`` on or off (and
    drop what it held); returns how many modules it set. With it on, a loaded export runs at FP
    speed and holds its quantized layers decoded (the FP model's memory for those layers); the
    packed buffers stay, so :func:`set_decode_cache(model, False)` gives the memory back."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            module.decode_cache = on
            module.__dict__.pop("_decoded", None)
            count += 1
    return count


def _op(module: nn.Module) -> tuple[str, type | None]:
    if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        return "linear", None  # Conv1D's (in, out) weight is stored as the (out, in) matrix: F.linear
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv", type(module)
    if isinstance(module, nn.Embedding):
        return "embedding", None
    raise TypeError(f"no packed form for {type(module).__name__}")

