"""Which layers of a model can be quantized, and what each costs in bytes at each bit-width.

The :class:`LayerTable` is the byte ledger every later stage relies on. It implements
DESIGN.md's definitions exactly:

* a layer at b ∈ {2, 3, 4, 8} bits costs ``ceil(n·b/8)`` bytes of packed codes, plus one
  scale per group at the scheme's scale dtype, plus one uint8 zero point per group when
  the scheme is asymmetric;
* a layer at 16 bits costs ``2·n`` bytes (fp16, no scales);
* everything else in the model's state dict (biases, norms, embeddings that are not
  quantized, persistent buffers) costs its own ``numel·itemsize``, and a tensor shared
  by several modules is counted once.

So ``bytes(plan) = Σ_l bytes_l(b_l) + other_bytes``, and that is also the tensor-data
size of the exported file.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch
from torch import nn

from mpsearch.errors import BudgetError, MPSearchError, SpecError
from mpsearch.plan import Plan, Width, parse_width, width_of, width_order
from mpsearch.quant import ct_layout
from mpsearch.quant.budget import MIB, Budget
from mpsearch.quant.scheme import BIT_MENU, FLOAT_BITS, Scheme

try:  # GPT-2 style layers keep their weight as (in, out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, this is belt and braces
    Conv1D = None

MATMUL_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d) + (
    (Conv1D,) if Conv1D is not None else ()
)


@dataclass(frozen=True)
class QuantLayer:
    """One quantizable weight, seen as a matrix of ``rows`` outputs × ``cols`` inputs.

    ``aliases`` are the other module names that share this very weight (tied weights):
    the weight is stored and counted once, under ``name``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rows: int
    cols: int
    group_size: int
    rule: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return self.rows * self.cols

    @property
    def n_groups(self) -> int:
        return self.rows * math.ceil(self.cols / self.group_size)

    def bytes(self, bits: int, scheme: Scheme) -> int:
        if bits == FLOAT_BITS:
            return 2 * self.n
        codes = math.ceil(self.n * bits / 8)
        return codes + self.n_groups * (scheme.scale_bytes + scheme.zero_bytes)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as a (rows=outputs, cols=inputs) matrix, a view where possible.

    >>> weight_matrix(nn.Conv2d(3, 8, kernel_size=3)).shape
    torch.Size([8, 27])
    """
    w = module.weight
    if Conv1D is not None and isinstance(module, Conv1D):
        return w.t()
    return w.reshape(w.shape[0], -1)


def _kind(module: nn.Module) -> str:
    return type(module).__name__


def _matches(name: str, pattern: str) -> bool:
    """Glob patterns (``encoder.layer.*.attention.*``), or a regex after ``re:``."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def tensor_key(t: torch.Tensor) -> tuple:
    # Two state-dict entries are the same stored tensor when they view the same memory the
    # same way; that is how tied weights show up (GPT-2's lm_head and wte).
    return (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def other_tensors(model: nn.Module, skip: set[tuple]) -> dict[str, torch.Tensor]:
    """The state dict's tensors except those keyed in ``skip``, a shared tensor once (first name)."""
    seen, out = set(skip), {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = tensor_key(t)
        if key not in seen:
            seen.add(key)
            out[name] = t.detach()
    return out


@dataclass
class LayerTable:
    """The quantizable layers of one model under one scheme and bit menu, with exact bytes.

    >>> table = LayerTable.from_model(nn.Sequential(nn.Linear(256, 64), nn.ReLU()), Scheme())
    >>> [layer.name for layer in table.layers], table.n_weights
    (['0'], 16384)
    >>> table.bytes({"0": 4}), table.other_bytes
    (8704, 256)
    >>> table.bpw({"0": 4})
    4.125
    """

    layers: list[QuantLayer]
    scheme: Scheme
    menu: tuple[int, ...] = BIT_MENU
    other_bytes: int = 0
    excluded: list[dict] = field(default_factory=list)
    unseen: tuple[str, ...] = ()  # layers the loss cannot see, in the table or left out (mpsearch.workload.reach)
    pinned: tuple[str, ...] = ()  # layers held at 16 bits whatever a plan says (layers.unseen = "fp16"): every entry is 16 for them
    target: str = "mpsearch"  # whose layout the bytes are: mpsearch's packing, llama.cpp's ("gguf") or "compressed-tensors"
    types: dict[str, dict[int, str]] = field(default_factory=dict)  # gguf: each layer's {level: llama.cpp type}
    dtype_bytes: int = 4  # the model's dtype size: compressed-tensors writes scales in it

    def __post_init__(self):
        self._by_name = {layer.name: layer for layer in self.layers}
        self._resolved: dict[str, dict[tuple, Width]] = {}
        if self.target == "gguf" and not self.types:
            from mpsearch.quant.gguf import layer_types

            self.types = {layer.name: layer_types(layer.cols, self.menu) for layer in self.layers}

    # -- discovery -------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        scheme: Scheme,
        menu: Sequence[int] = BIT_MENU,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        embeddings: bool = False,
        unseen: Sequence[str] = (),
        leave_unseen: bool = False,
        target: str = "mpsearch",
        pin_unseen: bool = False,
    ) -> "LayerTable":
        """Find the quantizable layers of ``model``.

        A weight shared by several modules becomes one layer (the first name, with the
        others as aliases). A weight tied to a module that is not quantizable, and every
        layer left out by the patterns, is listed in ``excluded`` with the reason; so is each
        of ``unseen`` (layers the loss cannot see) when ``leave_unseen``; with ``pin_unseen`` they stay
        in the table, pinned at 16 bits (every menu entry is 16 for them).
        With ``target = "gguf"`` a layer must also be a tensor llama.cpp's converter writes, with
        a type of the menu for its row length (:mod:`mpsearch.quant.gguf`); with ``target =
        "compressed-tensors"`` a weight that library packs (:mod:`mpsearch.quant.ct_layout`). The
        others are listed in ``excluded`` too. Raises :class:`SpecError` when an include pattern matches no layer.
        """
        types = MATMUL_TYPES + ((nn.Embedding,) if embeddings else ())
        owners = _owners(model)
        selection = _Selection(include, exclude)
        layers, excluded, quantized_keys = [], [], set()
        for key, members in _weights(model, types).items():
            reason = selection.left_out([n for n, _ in members], [(n, m) for n, m in owners.get(key, []) if not isinstance(m, types)])
            if not reason and leave_unseen and members[0][0] in unseen:
                reason = UNSEEN_RULE
            if not reason and target == "gguf":
                reason = _gguf_rule(members[0][0], weight_matrix(members[0][1]).shape[1], menu)
            if not reason and target == "compressed-tensors":
                cols = weight_matrix(members[0][1]).shape[1]
                for w in menu:  # every option's groups too: the library packs a layer whole or not at all
                    reason = reason or ct_layout.rule({_kind(m) for _, m in members}, cols, _group_rule(cols, _option_scheme(scheme, w))[0])
            if reason:
                excluded.append({"name": members[0][0], "reason": reason})
                continue
            layers.append(_quant_layer(members, scheme))
            quantized_keys.add(key)
        if not embeddings:  # left out by the embeddings rule: listed too, so that nothing is left out silently
            tables = {}
            for name, module in model.named_modules():
                if isinstance(module, nn.Embedding):
                    tables.setdefault(id(module.weight), name)
            excluded += [{"name": name, "reason": EMBEDDING_RULE} for name in tables.values()]
        selection.check_used()
        if not layers:
            if leave_unseen and unseen:
                raise SpecError("layers", "the loss cannot see any of the layers left after include/exclude; check loss.kind, or set layers.unseen = \"search\"")
            raise SpecError("layers", "no quantizable layer is left after include/exclude; loosen the patterns")
        other_bytes = sum(t.numel() * t.element_size() for t in other_tensors(model, quantized_keys).values())
        return cls(
            layers=layers, scheme=scheme, menu=tuple(sorted(set(menu), key=width_order)), other_bytes=other_bytes, excluded=excluded, unseen=tuple(unseen),
            pinned=tuple(n for n in unseen if pin_unseen and any(layer.name == n for layer in layers)),
            target=target, dtype_bytes=next(model.parameters()).element_size(),
        )

    # -- the ledger ------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def n_weights(self) -> int:
        return sum(layer.n for layer in self.layers)

    def layer(self, name: str) -> QuantLayer:
        try:
            return self._by_name[name]
        except KeyError:
            raise MPSearchError(f"no quantizable layer named {name!r}; `mpsearch layers` lists them") from None

    def widths(self, plan: Plan | Mapping[str, int]) -> dict[str, Width]:
        """The plan's menu entry for each layer, matched by what its choice quantizes to (bits,
        group size, symmetry): a resolved choice (plan.json writes every field) reads back as the
        entry it came from, and an option that comes to the same as another entry for a layer (a
        ragged group's per-channel rule) reads as the first of them."""
        plan = Plan.coerce(plan)
        out = {}
        for name, choice in plan.layers.items():
            if name not in self._by_name:
                out[name] = width_of(choice)
                continue
            layer = self.layer(name)
            group = choice.group_size if choice.group_size is not None else layer.group_size
            sym = choice.symmetric if choice.symmetric is not None else self.scheme.symmetric
            out[name] = self._entries(name).get(_entry_key(choice.bits, group, sym), width_of(choice, layer.group_size, self.scheme.symmetric))
        return out

    def _entries(self, name: str) -> dict[tuple, Width]:
        """``{(bits, group size, symmetric): menu entry}`` for layer ``name`` (the first entry of each)."""
        found = self._resolved.get(name)
        if found is None:
            found = {}
            entries = (FLOAT_BITS,) if name in self.pinned else sorted(self.types[name], key=width_order) if self.target == "gguf" else self.menu
            for w in entries:
                layer, scheme, bits = self.at(name, w)
                found.setdefault(_entry_key(bits, layer.group_size, scheme.symmetric), w)
            self._resolved[name] = found
        return found

    def at(self, name: str, width: Width) -> tuple[QuantLayer, Scheme, int]:
        """Layer ``name`` as menu entry ``width`` quantizes it: the layer with the group size it
        takes then, the scheme, and the bits. Plain bits keep the study's scheme; a scheme option
        (``"2g32"``) takes its own group size (under the study's ragged rule) and symmetry."""
        layer = self.layer(name)
        bits, group, sym = parse_width(width)
        if group is None and sym is None:
            return layer, self.scheme, bits
        scheme = _option_scheme(self.scheme, width)
        g, rule = _group_rule(layer.cols, scheme)
        return replace(layer, group_size=g, rule=rule), scheme, bits

    def levels(self, name: str) -> tuple[Width, ...]:
        """The menu's entries layer ``name`` can take, each once: for the gguf target the levels
        its types give it; else the menu, less an option that comes to the same as an earlier entry."""
        self.layer(name)
        return tuple(self._entries(name).values())

    def layer_level(self, name: str, bits: Width) -> Width:
        """The level the layer takes for ``bits``: ``bits``, or the next one up it can take (gguf);
        for a scheme option that comes to the same as an earlier entry for this layer (a group the
        ragged rule makes per-channel), that entry."""
        if name in self.pinned:
            return FLOAT_BITS
        if self.target != "gguf":
            layer, scheme, b = self.at(name, bits)
            return self._entries(name).get(_entry_key(b, layer.group_size, scheme.symmetric), bits)
        from mpsearch.quant.gguf import effective_level

        return effective_level(self.types[name], bits)

    def type_of(self, name: str, bits: int) -> str | None:
        """The llama.cpp type layer ``name`` takes for ``bits`` (gguf target), else None."""
        return self.types[name][self.layer_level(name, bits)] if self.target == "gguf" else None

    def layer_bytes(self, name: str, bits: Width) -> int:
        """Exact bytes of layer ``name`` at menu entry ``bits`` (at the level it takes for them)."""
        if name in self.pinned:
            bits = FLOAT_BITS
        if self.target == "compressed-tensors":
            layer, scheme, b = self.at(name, bits)
            return ct_layout.layer_bytes(
                rows=layer.rows, cols=layer.cols, bits=b, group_size=layer.group_size, symmetric=scheme.symmetric, scale_bytes=self.dtype_bytes,
            )
        if self.target != "gguf":
            layer, scheme, b = self.at(name, bits)
            return layer.bytes(b, scheme)
        layer = self.layer(name)
        from mpsearch.quant.gguf import type_bytes

        kind = self.type_of(name, bits)
        return 2 * layer.n if kind == "F16" else type_bytes(kind, layer.rows, layer.cols)

    def check_plan(self, plan: Plan | Mapping[str, int]) -> dict[str, Width]:
        """The plan's ``{layer: menu entry}``, once it names exactly this table's layers with entries of its menu."""
        bits = self.widths(plan)
        missing = [n for n in self.names if n not in bits]
        extra = [n for n in bits if n not in self._by_name]
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unknown {extra[:3]}"
            raise MPSearchError(f"plan does not match the model's layers ({what}); plans come from `mpsearch layers` names")
        bad = {n: b for n, b in bits.items() if b not in self.levels(n)}
        if bad:
            name, b = next(iter(bad.items()))
            menu = "the bit menu" if self.target != "gguf" else f"the levels llama.cpp's types give this layer (rows of {self.layer(name).cols})"
            raise MPSearchError(f"plan gives {name!r} {b!r} bits, which is not in {menu} {list(self.levels(name))}")
        return bits

    def quantized_bytes(self, plan: Plan | Mapping[str, int]) -> int:
        """Bytes of the quantizable layers alone: codes, scales and zero points."""
        bits = self.check_plan(plan)
        return sum(self.layer_bytes(name, b) for name, b in bits.items())

    def bytes(self, plan: Plan | Mapping[str, int]) -> int:
        """bytes(plan): the exported model's exact tensor bytes."""
        return self.quantized_bytes(plan) + self.other_bytes

    def bpw(self, plan: Plan | Mapping[str, int]) -> float:
        """Effective bits per quantizable weight, scales and zero points included."""
        return self.quantized_bytes(plan) * 8 / self.n_weights

    def uniform(self, bits: Width) -> Plan:
        """Every layer at ``bits`` (for the gguf target, at the level each takes for them)."""
        return Plan.of_bits({name: self.layer_level(name, bits) for name in self.names})

    def budget_bytes(self, budget: Budget) -> int:
        """The byte limit ``budget`` stands for, checked against the smallest and largest plan."""
        if budget.unit == "bytes":
            limit = int(budget.value)
        elif budget.unit == "mib":
            limit = math.floor(budget.value * MIB)
        else:
            limit = self.other_bytes + math.floor(budget.value * self.n_weights / 8)
        lo_bits, hi_bits = self.menu[0], self.menu[-1]
        lo, hi = self.bytes(self.uniform(lo_bits)), self.bytes(self.uniform(hi_bits))
        field_name = f"budget.{budget.unit}"
        if limit < lo:
            raise BudgetError(
                field_name,
                f"{budget} ({limit} bytes) is below the smallest plan, all {lo_bits}-bit at {lo} bytes "
                f"({self.bpw(self.uniform(lo_bits)):.4g} bpw); raise it or add smaller bits to quant.bits",
            )
        if limit > hi:
            raise BudgetError(
                field_name,
                f"{budget} ({limit} bytes) is above the largest plan, all {hi_bits}-bit at {hi} bytes "
                f"({self.bpw(self.uniform(hi_bits)):.4g} bpw), so there is nothing to choose; lower it",
            )
        return limit

    def to_json(self) -> dict:
        """The `mpsearch layers --json` document (DESIGN.md's shape, keys only ever added)."""
        rows = []
        for layer in self.layers:
            row = {
                "name": layer.name,
                "kind": layer.kind,
                "shape": list(layer.shape),
                "n": layer.n,
                "bytes": {str(b): self.layer_bytes(layer.name, b) for b in self.menu},
                "group_size": layer.group_size,
            }
            if layer.rule:
                row["rule"] = layer.rule
            if layer.aliases:
                row["aliases"] = list(layer.aliases)
            if self.target == "gguf":
                row["types"] = {str(b): self.type_of(layer.name, b) for b in self.menu}
            rows.append(row)
        return {
            "layers": rows,
            "other_bytes": self.other_bytes,
            "n_weights": self.n_weights,
            "scheme": self.scheme.to_dict(),
            "menu": list(self.menu),
            "total_bytes": {str(b): self.bytes(self.uniform(b)) for b in self.menu},
            "excluded": self.excluded,
            "unseen": list(self.unseen),
            "pinned": list(self.pinned),
            "target": self.target,
        }


def _weights(model: nn.Module, types: tuple[type, ...]) -> dict[tuple, list[tuple[str, nn.Module]]]:
    """The modules of ``types`` grouped by the weight tensor they hold (tied weights: one group)."""
    groups: dict[tuple, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, types) and isinstance(getattr(module, "weight", None), torch.Tensor):
            groups.setdefault(tensor_key(module.weight), []).append((name, module))
    return groups


def _owners(model: nn.Module) -> dict[tuple, list[tuple[str, nn.Module]]]:
    """Every module holding each parameter, quantizable or not (to catch ties to embeddings)."""
    owners: dict[tuple, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(tensor_key(p), []).append((name, module))
    return owners


UNSEEN_RULE = (
    "the loss cannot see it (no term of the loss reads its output, so its sensitivity is exactly 0); it stays at the model's dtype. "
    'layers.unseen = "search" puts it in the plan'
)
EMBEDDING_RULE = "an embedding (a table lookup, not a matmul); set layers.embeddings = true to quantize it"


class _Selection:
    """The include/exclude patterns, and which include patterns matched anything."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]):
        self.include, self.exclude = include, exclude
        self.hits = {p: 0 for p in include}

    def left_out(self, names: list[str], other_owners: list[tuple[str, nn.Module]]) -> str | None:
        """Why the weight used by modules ``names`` is not a layer, or None when it is."""
        hits = [p for p in self.include if any(_matches(n, p) for n in names)]
        for p in hits:
            self.hits[p] += 1
        if other_owners:
            other_name, other = other_owners[0]
            hint = "set layers.embeddings = true to quantize it" if isinstance(other, nn.Embedding) else "it stays at its dtype"
            return f"weight tied to {_kind(other)} '{other_name}'; {hint}"
        if not hits:
            return "matches no layers.include pattern"
        blocked = [p for p in self.exclude if any(_matches(n, p) for n in names)]
        if blocked:
            return f"matches layers.exclude pattern {blocked[0]!r}"
        return None

    def check_used(self) -> None:
        for pattern, count in self.hits.items():
            if count == 0:
                raise SpecError(
                    "layers.include",
                    f"pattern {pattern!r} matches no quantizable layer; run `mpsearch layers` with include = [\"*\"] to list their names",
                )


def _gguf_rule(name: str, cols: int, menu: Sequence[int]) -> str | None:
    """Why the gguf target cannot take a layer, or None when it can."""
    from mpsearch.quant.gguf import NO_TENSOR_RULE, gguf_tensor, layer_types

    if gguf_tensor(name) is None:
        return NO_TENSOR_RULE
    if not layer_types(cols, tuple(menu)):
        return f"no llama.cpp type of quant.bits {list(menu)} takes rows of {cols}; add 16 to quant.bits to keep it at F16"
    return None


def _quant_layer(members: list[tuple[str, nn.Module]], scheme: Scheme) -> QuantLayer:
    name, module = members[0]
    rows, cols = weight_matrix(module).shape
    group, rule = _group_rule(cols, scheme)
    return QuantLayer(
        name=name,
        kind="+".join(sorted({_kind(m) for _, m in members})),
        shape=tuple(module.weight.shape),
        rows=rows,
        cols=cols,
        group_size=group,
        rule=rule,
        aliases=tuple(n for n, _ in members[1:]),
    )


def _entry_key(bits: int, group: int, symmetric: bool) -> tuple:
    """What a menu entry quantizes a layer to: two entries with the same key are one candidate."""
    return (FLOAT_BITS, None, None) if bits == FLOAT_BITS else (bits, group, symmetric)


def _option_scheme(scheme: Scheme, width: Width) -> Scheme:
    """The study's scheme with a scheme option's group size and symmetry."""
    _bits, group, sym = parse_width(width)
    return replace(scheme, group_size=scheme.group_size if group is None else group, symmetric=scheme.symmetric if sym is None else sym)


def _group_rule(cols: int, scheme: Scheme) -> tuple[int, str | None]:
    """The group size a layer with ``cols`` inputs actually gets, and the rule if it differs."""
    g = scheme.group_size
    if g == -1:
        return cols, None
    if cols % g == 0:
        return g, None
    if cols < g:
        return cols, f"per-channel: input dim {cols} is smaller than group {g}"
    if scheme.ragged == "per-channel":
        return cols, f"per-channel: input dim {cols} is not a multiple of group {g}"
    return g, f"pad: input dim {cols} is not a multiple of group {g}; the last group of each row holds {cols % g}"

