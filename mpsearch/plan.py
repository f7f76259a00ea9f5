"""The plan: which bits (and which scheme) every quantizable layer gets.

One versioned type, used everywhere a plan travels: the allocators return it, a trial stores
it once (``plan`` user attribute), ``plan.json`` and the HTTP API carry it, and every ``--json``
output prints it. Its JSON form is::

    {"format_version": 1, "layers": {"encoder.layer.0.attention.self.query": {"bits": 4}, ...}}

The layers are in the model's order. A choice holds the bits and, where a layer departs from
the study's scheme, its own ``group_size``, ``symmetric`` and ``method``; a field left out
means "the study's scheme". Exports write every field out (see ``resolved``); a gguf-target
export writes each layer's llama.cpp ``type`` too.

>>> plan = Plan.of_bits({"fc1": 4, "fc2": 16})
>>> plan.bits()
{'fc1': 4, 'fc2': 16}
>>> Plan.from_json(plan.to_json()) == plan
True
>>> plan.to_json()
{'format_version': 1, 'layers': {'fc1': {'bits': 4}, 'fc2': {'bits': 16}}}
>>> Plan.of_bits({"fc1": 7})
Traceback (most recent call last):
...
mpsearch.errors.MPSearchError: plan: layer 'fc1' has 7 bits; a plan's bits are 2, 3, 4, 5, 6, 8 or 16
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterator, Literal, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mpsearch.errors import MPSearchError

PLAN_VERSION = 1

BIT_MENU = (2, 3, 4, 8, 16)
"""Every bit-width mpsearch's own packing knows: integer codes at 2, 3, 4 and 8 bits, fp16 at 16."""

PLAN_BITS = (2, 3, 4, 5, 6, 8, 16)
"""Every level a plan may hold: :data:`BIT_MENU`, and 5 and 6 for llama.cpp's Q5/Q6 types (the
gguf target, :mod:`mpsearch.quant.gguf`)."""

FLOAT_BITS = 16

Width = int | str
"""One entry of a study's menu: bits under the study's scheme (``4``), or a scheme option's label
(``"2g32"``: 2 bits in groups of 32; ``"3g64a"``: 3 bits in groups of 64, asymmetric; ``"4s"``:
4 bits symmetric in an asymmetric study). A plan holds an option as the layer's ``bits`` with its
own ``group_size`` and ``symmetric``, so a plan is still one document; :func:`width_of` reads it back."""

_OPTION = re.compile(r"^([0-9]+)(?:g([0-9]+))?([as])?$")


def parse_width(width: Width) -> tuple[int, int | None, bool | None]:
    """``(bits, group_size, symmetric)`` of a menu entry; None where it keeps the study's.

    >>> parse_width(4), parse_width("2g32"), parse_width("3g64a")
    ((4, None, None), (2, 32, None), (3, 64, False))
    >>> parse_width("2x")
    Traceback (most recent call last):
    ...
    mpsearch.errors.MPSearchError: '2x' is not a scheme option; write BITS[gGROUP][a|s], e.g. "2g32" or "3g64a"
    """
    if isinstance(width, int) and not isinstance(width, bool):
        return width, None, None
    m = _OPTION.match(str(width))
    if not m or (m.group(2) is None and m.group(3) is None) or (m.group(2) is not None and int(m.group(2)) < 1):
        raise MPSearchError(f'{width!r} is not a scheme option; write BITS[gGROUP][a|s], e.g. "2g32" or "3g64a"')
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None, None if m.group(3) is None else m.group(3) == "s"


def bits_of(width: Width) -> int:
    return parse_width(width)[0]


def width_of(choice: "LayerChoice", group_size: int | None = None, symmetric: bool | None = None) -> Width:
    """The menu entry a layer's choice is: its bits, or an option's label where its group size or
    symmetry differs from the study's (``group_size``, ``symmetric``: the layer's own, so that a
    resolved choice that writes them out reads back as plain bits).

    >>> width_of(LayerChoice(bits=2, group_size=32)), width_of(LayerChoice(bits=4, group_size=128, symmetric=True), 128, True)
    ('2g32', 4)
    """
    group = None if choice.group_size == group_size else choice.group_size
    sym = None if choice.symmetric == symmetric else choice.symmetric
    if choice.bits == FLOAT_BITS or (group is None and sym is None):
        return choice.bits
    return f"{choice.bits}{'' if group is None else f'g{group}'}{'' if sym is None else 's' if sym else 'a'}"


def width_key(key: Any) -> Width:
    """A menu entry from a JSON key (``"4"`` → 4, ``"2g32"`` as it is).

    >>> width_key("4"), width_key(8), width_key("2g32")
    (4, 8, '2g32')
    """
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return key if isinstance(key, str) else int(key)


def choice_of(width: Width) -> "LayerChoice":
    bits, group, sym = parse_width(width)
    return LayerChoice(bits=bits, group_size=group, symmetric=sym)


def width_order(width: Width) -> tuple:
    """A sort key for menus: by bits, then options by their overhead (smaller groups cost more).

    >>> sorted([4, "2g32", 2, "2g64", 16, "2g128a"], key=width_order)
    [2, '2g128a', '2g64', '2g32', 4, 16]
    """
    bits, group, sym = parse_width(width)
    return (bits, (1 / group if group else 0) + (0.5 / (group or 128) if sym is False else 0), str(width))


class LayerChoice(BaseModel):
    """One layer's choice: its bits, and any part of its scheme that differs from the study's."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    bits: int
    group_size: int | None = None
    symmetric: bool | None = None
    method: str | None = None
    type: str | None = None  # the gguf target's llama.cpp type (Q4_K, IQ4_NL, ...), written out by its exports

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in PLAN_BITS:
            raise ValueError(f"{value} bits; a plan's bits are 2, 3, 4, 5, 6, 8 or 16")
        return value

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Plan(BaseModel):
    """An ordered mapping from layer name to :class:`LayerChoice`; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format_version: Literal[1] = PLAN_VERSION
    layers: dict[str, LayerChoice]

    # -- building --------------------------------------------------------------------

    @classmethod
    def of_bits(cls, bits: Mapping[str, Width]) -> "Plan":
        """A plan that gives each layer ``bits[layer]``: bits under the study's scheme, or a
        scheme option's label (see :data:`Width`)."""
        layers = {}
        for name, b in bits.items():
            try:
                layers[name] = choice_of(b) if isinstance(b, str) else LayerChoice(bits=int(b) if not isinstance(b, bool) else b)
            except ValidationError:
                raise MPSearchError(f"plan: layer {name!r} has {b} bits; a plan's bits are 2, 3, 4, 5, 6, 8 or 16") from None
        return cls(layers=layers)

    @classmethod
    def coerce(cls, value: "Plan | Mapping[str, int]") -> "Plan":
        """``value`` as a plan: a plan as it is, a ``{layer: bits}`` mapping read with :meth:`of_bits`."""
        return value if isinstance(value, Plan) else cls.of_bits(value)

    @classmethod
    def from_json(cls, doc: Any, where: str = "plan") -> "Plan":
        """Read a plan's JSON document (a dict or its text); another ``format_version`` is refused."""
        if isinstance(doc, (str, bytes)):
            try:
                doc = json.loads(doc)
            except json.JSONDecodeError as e:
                raise MPSearchError(f"{where} is not valid JSON ({e.msg}); write it as plan JSON") from None
        if not isinstance(doc, dict) or "layers" not in doc:
            raise MPSearchError(f"{where} is not a plan: expected {{\"format_version\": {PLAN_VERSION}, \"layers\": {{...}}}}")
        if doc.get("format_version") != PLAN_VERSION:
            raise MPSearchError(
                f"{where} has plan format_version {doc.get('format_version')!r}; this mpsearch reads {PLAN_VERSION}: use the mpsearch that wrote it"
            )
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            loc = ".".join(str(part) for part in first["loc"])
            problem = str((first.get("ctx") or {}).get("error", first["msg"]))
            raise MPSearchError(f"{where}: {loc}: {problem}") from None

    # -- reading ---------------------------------------------------------------------

    def bits(self) -> dict[str, int]:
        """``{layer: bits}``, in the plan's order."""
        return {name: choice.bits for name, choice in self.layers.items()}

    def widths(self) -> dict[str, Width]:
        """``{layer: menu entry}``: bits, or a scheme option's label (:func:`width_of`). A plan
        whose choices write out every field (plan.json) is read against its model's layers by
        :meth:`~mpsearch.quant.layers.LayerTable.widths`."""
        return {name: width_of(c) for name, c in self.layers.items()}

    def names(self) -> list[str]:
        return list(self.layers)

    def __getitem__(self, name: str) -> LayerChoice:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # iterate names, as a mapping would
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "layers": {name: c.to_json() for name, c in self.layers.items()}}

    def digest(self) -> str:
        """A hash of the plan: equal plans (same layers, order and choices) have equal digests."""
        return hashlib.blake2b(json.dumps(self.to_json()).encode(), digest_size=16).hexdigest()

    def with_choices(self, **changes: LayerChoice) -> "Plan":
        """A copy with some layers' choices replaced (by keyword: ``plan.with_choices(**{name: choice})``)."""
        unknown = [n for n in changes if n not in self.layers]
        if unknown:
            raise MPSearchError(f"plan has no layer {unknown[0]!r}")
        return Plan(layers={name: changes.get(name, choice) for name, choice in self.layers.items()})
