"""The quantization core: schemes, the layer table and its exact byte ledger.

Pure tensor code: nothing here touches a database or Ray.
"""

from mpsearch.quant.budget import Budget
from mpsearch.quant.layers import LayerTable, QuantLayer, weight_matrix
from mpsearch.quant.scheme import BIT_MENU, Scheme

__all__ = ["BIT_MENU", "Budget", "LayerTable", "QuantLayer", "Scheme", "weight_matrix"]
