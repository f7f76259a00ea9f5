"""Quantization methods, and the tensors an export of a plan writes.

A method turns one weight matrix into a :class:`QuantizedWeight` at given bits. Methods
that need calibration statistics (``gptq``) get the layer's prepared
:class:`~mpsearch.quant.gptq.Curvature`; the others ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import nn

from mpsearch.errors import MPSearchError
from mpsearch.quant.gptq import Curvature, quantize_gptq
from mpsearch.quant.layers import Conv1D, other_tensors, tensor_key
from mpsearch.quant.rtn import QuantizedWeight, quantize_rtn
from mpsearch.quant.scheme import Scheme
from mpsearch.registry import Registry

if TYPE_CHECKING:
    from mpsearch.plan import Plan
    from mpsearch.quant.bank import CandidateBank


@dataclass(frozen=True)
class Method:
    quantize: Callable[[torch.Tensor, int, int, Scheme, Curvature | None], QuantizedWeight]
    needs_calibration: bool


QUANTIZERS: Registry[Method] = Registry("quantization method")


def _rtn(w: torch.Tensor, bits: int, group_size: int, scheme: Scheme, curvature: Curvature | None) -> QuantizedWeight:
    return quantize_rtn(w, bits, group_size, symmetric=scheme.symmetric, scale_dtype=scheme.scale_dtype, clip=scheme.clip != "none")


def _gptq(w: torch.Tensor, bits: int, group_size: int, scheme: Scheme, curvature: Curvature | None) -> QuantizedWeight:
    if curvature is None:  # a layer whose inputs cannot be collected (the bank reports which)
        return _rtn(w, bits, group_size, scheme, None)
    return quantize_gptq(
        w, bits, group_size, curvature, symmetric=scheme.symmetric, scale_dtype=scheme.scale_dtype, clip=scheme.clip != "none", weighted=scheme.clip == "weighted",
    )


QUANTIZERS.register("rtn")(Method(_rtn, needs_calibration=False))
QUANTIZERS.register("gptq")(Method(_gptq, needs_calibration=True))


def quantizer(method: str) -> Method:
    try:
        return QUANTIZERS.get(method)
    except MPSearchError as e:
        raise MPSearchError(f"quant.method: {e}") from None


def module_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """A (rows × cols) matrix in the layout and dtype of ``module.weight``, contiguous."""
    w = module.weight
    if Conv1D is not None and isinstance(module, Conv1D):
        return matrix.t().to(w.dtype).contiguous()  # GPT-2's Conv1D keeps (in, out)
    return matrix.reshape(w.shape).to(w.dtype).contiguous()


def packed_tensors(model: nn.Module, bank: "CandidateBank", plan: "Plan | Mapping[str, int]") -> dict[str, torch.Tensor]:
    """Every tensor an export of ``plan`` stores, by name, for the FP ``model``.

    A layer at b < 16 bits becomes ``NAME.qweight`` (packed uint8 codes, see
    :mod:`mpsearch.quant.packing`), ``NAME.scales`` and, when asymmetric, ``NAME.zeros``;
    at 16 bits ``NAME.weight`` in fp16. Every other state-dict tensor is kept as it is,
    a shared one once under its first name.
    """
    out = bank.tensors(plan)
    modules = dict(model.named_modules())
    quantized = {tensor_key(modules[layer.name].weight) for layer in bank.table.layers}
    out.update(other_tensors(model, quantized))
    return out
