"""The quantization core: schemes, the layer table and its exact byte ledger, quantizers
(round-to-nearest and GPTQ), bit packing, and the candidate bank.

Pure tensor code: nothing here touches a database or Ray.
"""

from mpsearch.quant.apply import QUANTIZERS, packed_tensors
from mpsearch.quant.bank import Candidate, CandidateBank
from mpsearch.quant.budget import Budget
from mpsearch.quant.calibration import input_moments
from mpsearch.quant.gptq import Curvature, quantize_gptq
from mpsearch.quant.layers import LayerTable, QuantLayer, weight_matrix
from mpsearch.quant.packing import pack, unpack
from mpsearch.quant.rtn import QuantizedWeight, quantize_rtn
from mpsearch.quant.scheme import BIT_MENU, Scheme

__all__ = [
    "BIT_MENU",
    "Budget",
    "Candidate",
    "CandidateBank",
    "Curvature",
    "LayerTable",
    "QUANTIZERS",
    "QuantLayer",
    "QuantizedWeight",
    "Scheme",
    "input_moments",
    "pack",
    "packed_tensors",
    "quantize_gptq",
    "quantize_rtn",
    "unpack",
    "weight_matrix",
]
