"""The quantization core: schemes, the layer table and its exact byte ledger.

Pure tensor code: nothing here touches a database or Ray.
"""

from mpsearch.quant.apply import QUANTIZERS, packed_tensors, quantize_model_
from mpsearch.quant.budget import Budget
from mpsearch.quant.layers import LayerTable, QuantLayer, weight_matrix
from mpsearch.quant.packing import pack, unpack
from mpsearch.quant.rtn import QuantizedWeight, quantize_rtn
from mpsearch.quant.scheme import BIT_MENU, Scheme

__all__ = [
    "BIT_MENU",
    "Budget",
    "LayerTable",
    "QUANTIZERS",
    "QuantLayer",
    "QuantizedWeight",
    "Scheme",
    "pack",
    "packed_tensors",
    "quantize_model_",
    "quantize_rtn",
    "unpack",
    "weight_matrix",
]
