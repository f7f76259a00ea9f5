"""compressed-tensors' layout of one layer: which layers it packs, and their exact bytes.

The ``compressed-tensors`` target (``[target] format = "compressed-tensors"``) searches mpsearch's
own candidates (the codes are the same) but counts each layer at the bytes it takes in the
Hugging Face folder that the export writes (:mod:`mpsearch.export.targets.compressed_tensors`):

* symmetric: ``pack-quantized``, the signed codes packed densely into int32 words along each row
  (``ceil(cols·bits/32)`` words a row), the scales in the model's dtype, and ``weight_shape``
  (two int64);
* asymmetric: ``naive-quantized``, one int8 code a weight, the scales in the model's dtype and
  one int8 zero point a group (a packed zero point does not load in transformers 5);
* 16 bits: the weight dense, in fp16 (transformers casts it to the model's dtype at load).

Only ``Linear`` and ``Embedding`` weights are packable, and only with equal groups along the row
(a group size that divides the row, or one group a row); the target leaves the others out of
the search (:func:`rule`), at the model's dtype like any other tensor.

>>> layer_bytes(rows=384, cols=384, bits=4, group_size=128, symmetric=True, scale_bytes=4)
78352
>>> layer_bytes(rows=384, cols=384, bits=3, group_size=128, symmetric=False, scale_bytes=4)
153216
>>> rule(("Conv1D",), cols=768, group_size=128) is not None
True
"""

from __future__ import annotations

import math
from typing import Iterable

from mpsearch.plan import FLOAT_BITS

PACKABLE_KINDS = frozenset({"Linear", "Embedding"})
SHAPE_BYTES = 16  # weight_shape: (rows, cols) as int64


def rule(kinds: Iterable[str], cols: int, group_size: int) -> str | None:
    """Why compressed-tensors cannot hold a layer packed (``kinds``: its modules' class names), or None."""
    odd = sorted(set(kinds) - PACKABLE_KINDS)
    if odd:
        return f"compressed-tensors packs Linear and Embedding weights only, not {odd[0]}; kept at the model's dtype"
    if group_size < cols and cols % group_size:
        return f"compressed-tensors needs equal groups and group {group_size} does not divide its {cols} columns; kept at the model's dtype"
    return None


def layer_bytes(*, rows: int, cols: int, bits: int, group_size: int, symmetric: bool, scale_bytes: int) -> int:
    """The layer's tensor bytes in the compressed-tensors folder (``scale_bytes``: the model dtype's size)."""
    if bits == FLOAT_BITS:
        return 2 * rows * cols
    groups = rows * math.ceil(cols / group_size)
    if symmetric:
        return 4 * rows * math.ceil(cols * bits / 32) + groups * scale_bytes + SHAPE_BYTES
    return rows * cols + groups * (scale_bytes + 1)
