"""Profiles, the sensitivity methods' registry, and ranking.

A sensitivity method scores every (layer, bits) candidate, larger meaning quantizing hurts more.
Each method is one entry of :data:`SENSITIVITY`, registered by its own module
(``hessian.py``, ``perturbation.py``, ``fisher.py``): its name, the label its scores get on a
plot, the settings its profile is keyed by, and how to compute it. `mpsearch analyze`'s
``--method`` choices, the plot label and the dispatch all read from there, so a new method is a
new module with one ``@SENSITIVITY.register``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mpsearch.plan import FLOAT_BITS, width_key
from mpsearch.registry import Registry


@dataclass(frozen=True)
class Options:
    """Every method's settings, as `mpsearch analyze` takes them; each method reads its own."""

    mode: str = "all"
    estimator: str = "auto"
    tol: float | None = None
    max_probes: int | None = None
    seed: int = 0
    workers: int = 2
    address: str | None = None
    fisher_samples: int = 4


@dataclass(frozen=True)
class Method:
    """One sensitivity method.

    ``params(workload, options)`` gives the settings the stored profile is keyed by (and that
    ``compute`` uses); ``compute(workload, params, options, pool, progress)`` gives the profile's
    rows, one per layer: ``{"name", "n", "score": {"2": float, ...}}`` plus whatever else the
    method measures (a trace, its standard error). Given a scorer pool, a method ``on_scorer``
    runs in the first scorer, on its device (a module-level ``compute`` travels to a Ray worker).
    """

    label: str
    params: Callable[[Any, Options], dict]
    compute: Callable[..., list[dict]]
    on_scorer: bool = True  # computed where a scorer's workload lives (its device); False: it spreads over the pool itself


SENSITIVITY: Registry[Method] = Registry("sensitivity method")


@dataclass
class Profile:
    method: str
    layers: list[dict]
    ranking: list[str]
    seconds: float
    params: dict = field(default_factory=dict)
    reused: bool = False

    def to_json(self) -> dict:
        """DESIGN.md's `analyze --json` document (keys only ever added)."""
        return {
            "method": self.method,
            "layers": self.layers,
            "ranking": self.ranking,
            "params": self.params,
            "seconds": self.seconds,
            "reused": self.reused,
        }

    def scores(self) -> dict[str, dict[int, float]]:
        """``{layer: {bits: score}}``: what the allocators read."""
        return {row["name"]: {width_key(b): v for b, v in row["score"].items()} for row in self.layers}

    @classmethod
    def from_values(cls, method: str, values: dict, params: dict, seconds: float, reused: bool) -> "Profile":
        return cls(method=method, layers=values["layers"], ranking=values["ranking"], seconds=seconds, params=params, reused=reused)


def lowest_bits(menu: tuple[int, ...]) -> str:
    """The menu's lowest integer bit-width, as a score key: the one layers are ranked by."""
    return str(min((b for b in menu if isinstance(b, int) and b != FLOAT_BITS), default=menu[0]))  # scheme options ("2g32") aside


def rank(layers: list[dict], menu: tuple[int, ...]) -> list[str]:
    """Most sensitive first, by the score at the lowest integer bit-width of the menu.

    >>> rank([{"name": "a", "score": {"2": 0.1}}, {"name": "b", "score": {"2": 0.5}}], (2, 16))
    ['b', 'a']
    """
    low = lowest_bits(menu)
    return [row["name"] for row in sorted(layers, key=lambda r: (-_finite(r["score"][low]), r["name"]))]


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else -math.inf
