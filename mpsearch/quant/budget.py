"""Memory budgets: bytes, MiB or effective bits per weight.

A budget is kept as the user wrote it and turned into a byte limit only against a
:class:`~mpsearch.quant.layers.LayerTable`, because bpw depends on the model.

>>> Budget.parse("4.0bpw")
Budget(unit='bpw', value=4.0)
>>> Budget.parse("5.2MiB").value
5.2
>>> str(Budget.parse(5000000))
'5000000'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from mpsearch.errors import MPSearchError

MIB = 1 << 20

_FORM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(bpw|MiB|B)?\s*$")


@dataclass(frozen=True)
class Budget:
    unit: Literal["bytes", "mib", "bpw"]
    value: float

    def __post_init__(self):
        if not math.isfinite(self.value):
            raise MPSearchError(f"budget.{self.unit}: {self.value} is not a finite number; give a size such as 4.0bpw, 5.2MiB or 5000000")
        if self.value <= 0:
            raise MPSearchError(f"budget.{self.unit}: must be > 0, got {self.value}")

    @classmethod
    def parse(cls, text: str | int | float) -> "Budget":
        """Read ``5000000`` (bytes), ``"5.2MiB"`` or ``"4.0bpw"``."""
        if isinstance(text, bool):
            raise MPSearchError(f"budget: expected bytes, 'N MiB' or 'N bpw', got {text!r}")
        if isinstance(text, (int, float)):
            return cls("bytes", float(text))
        match = _FORM.match(str(text))
        if not match:
            raise MPSearchError(
                f"budget: cannot read {text!r}; write bytes (5000000), MiB (5.2MiB) or bpw (4.0bpw)"
            )
        number, unit = float(match.group(1)), match.group(2)
        return cls({"bpw": "bpw", "MiB": "mib"}.get(unit, "bytes"), number)

    def __str__(self) -> str:
        if self.unit == "bytes":
            return f"{self.value:.0f}"
        return f"{self.value:g}{'bpw' if self.unit == 'bpw' else 'MiB'}"
