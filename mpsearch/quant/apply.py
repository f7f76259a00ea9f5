"""Putting a plan into a model: fake-quantized weights in place, or the packed tensors an export writes."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from mpsearch.errors import MPSearchError
from mpsearch.quant.layers import Conv1D, LayerTable, other_tensors, tensor_key, weight_matrix
from mpsearch.quant.packing import pack
from mpsearch.quant.rtn import QuantizedWeight, quantize_rtn
from mpsearch.quant.scheme import FLOAT_BITS, Scheme
from mpsearch.registry import Registry

Quantizer = Callable[[torch.Tensor, int, int, Scheme], QuantizedWeight]
QUANTIZERS: Registry[Quantizer] = Registry("quantization method")


@QUANTIZERS.register("rtn")
def _rtn(w: torch.Tensor, bits: int, group_size: int, scheme: Scheme) -> QuantizedWeight:
    return quantize_rtn(w, bits, group_size, symmetric=scheme.symmetric, scale_dtype=scheme.scale_dtype)


def quantizer(method: str) -> Quantizer:
    try:
        return QUANTIZERS.get(method)
    except MPSearchError as e:
        raise MPSearchError(f"quant.method: {e}") from None


def set_weight_matrix_(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write a (rows × cols) matrix into ``module.weight``, in the weight's own layout and dtype."""
    w = module.weight
    with torch.no_grad():
        if Conv1D is not None and isinstance(module, Conv1D):
            w.copy_(matrix.t().to(w.dtype))  # GPT-2's Conv1D keeps (in, out)
        else:
            w.copy_(matrix.reshape(w.shape).to(w.dtype))


def quantize_model_(model: nn.Module, table: LayerTable, plan: Mapping[str, int]) -> nn.Module:
    """Replace every planned layer's weight by its quantize→dequantize image, in place."""
    table.check_plan(plan)
    quantize = quantizer(table.scheme.method)
    modules = dict(model.named_modules())
    for layer in table.layers:
        module, bits = modules[layer.name], plan[layer.name]
        w = weight_matrix(module).detach()
        if bits == FLOAT_BITS:
            fake = w.to(torch.float16)
        else:
            fake = quantize(w, bits, layer.group_size, table.scheme).dequantize(w.dtype)
        set_weight_matrix_(module, fake)
    return model


def packed_tensors(model: nn.Module, table: LayerTable, plan: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Every tensor an export of ``plan`` stores, by name, for the FP ``model``.

    A layer at b < 16 bits becomes ``NAME.qweight`` (packed uint8 codes, see
    :mod:`mpsearch.quant.packing`), ``NAME.scales`` and, when asymmetric, ``NAME.zeros``;
    at 16 bits ``NAME.weight`` in fp16. Every other state-dict tensor is kept as it is,
    a shared one once under its first name.
    """
    table.check_plan(plan)
    quantize = quantizer(table.scheme.method)
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    quantized = set()
    for layer in table.layers:
        module, bits = modules[layer.name], plan[layer.name]
        quantized.add(tensor_key(module.weight))
        w = weight_matrix(module).detach()
        if bits == FLOAT_BITS:
            out[f"{layer.name}.weight"] = w.to(torch.float16).contiguous()
            continue
        q = quantize(w, bits, layer.group_size, table.scheme)
        out[f"{layer.name}.qweight"] = pack(q.codes, bits)
        out[f"{layer.name}.scales"] = q.scales.contiguous()
        if q.zeros is not None:
            out[f"{layer.name}.zeros"] = q.zeros.contiguous()
    out.update(other_tensors(model, quantized))
    return out
