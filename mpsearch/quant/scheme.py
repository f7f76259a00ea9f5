"""How a layer's weight is quantized, apart from its bit-width.

A :class:`Scheme` is plain, versioned data. It is shared by every (layer, bits)
candidate of a study; the plan then says which bits each layer gets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from mpsearch.errors import MPSearchError
from mpsearch.plan import BIT_MENU, FLOAT_BITS  # noqa: F401 - the menu is the plan's; re-exported for quant users

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

RaggedRule = Literal["pad", "per-channel"]
ClipRule = Literal["none", "mse", "weighted"]


@dataclass(frozen=True)
class Scheme:
    """Group-wise weight-only integer quantization.

    Groups run along a weight's input dimension. ``group_size=-1`` gives one scale per
    output channel. Asymmetric schemes add one uint8 zero point per group.

    ``ragged`` is the rule for a layer whose input dimension is not a multiple of the
    group size: ``"pad"`` keeps the group size and lets the last group of each row be
    shorter; ``"per-channel"`` gives that layer one group per row. Either way the layer
    is reported with the rule it took.

    ``clip`` is how a group's range is set: ``"none"`` covers every weight; ``"mse"`` shrinks
    it where that lowers the group's squared error (:func:`~mpsearch.quant.rtn.fit_grid`);
    ``"weighted"`` (gptq) weighs each input column's error by its mean squared activation, the
    diagonal of the calibration ``XᵀX``. A layer quantized without calibration inputs clips by
    ``"mse"``.

    >>> Scheme(group_size=128).scale_bytes
    2
    >>> Scheme(group_size=0)
    Traceback (most recent call last):
    ...
    mpsearch.errors.MPSearchError: group_size must be -1 (per-channel) or a positive integer, got 0
    """

    group_size: int = 128
    symmetric: bool = True
    method: str = "rtn"
    scale_dtype: str = "float16"
    ragged: RaggedRule = "pad"
    damp: float = 0.1
    act_order: bool = True
    clip: ClipRule = "none"
    version: int = 1

    def __post_init__(self):
        if self.group_size != -1 and self.group_size < 1:
            raise MPSearchError(
                f"group_size must be -1 (per-channel) or a positive integer, got {self.group_size}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise MPSearchError(
                f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )
        if not 0 < self.damp < 1:
            raise MPSearchError(f"damp must be between 0 and 1 (a fraction of the mean diagonal), got {self.damp}")
        if self.ragged not in ("pad", "per-channel"):
            raise MPSearchError(f"ragged must be 'pad' or 'per-channel', got {self.ragged!r}")
        if self.clip not in ("none", "mse", "weighted"):
            raise MPSearchError(f"clip must be 'none', 'mse' or 'weighted', got {self.clip!r}")

    @property
    def scale_bytes(self) -> int:
        return SCALE_DTYPES[self.scale_dtype].itemsize

    @property
    def zero_bytes(self) -> int:
        """Bytes per group for zero points: uint8 codes when asymmetric, none otherwise."""
        return 0 if self.symmetric else 1

    def to_dict(self) -> dict:
        """The scheme as data; ``clip`` (a later field) only when set, so banks and profiles
        made before it keep their keys."""
        out = asdict(self)
        if out["clip"] == "none":
            del out["clip"]
        return out
