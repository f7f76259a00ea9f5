"""``plan.json``: the versioned document that says what an export holds and where it came from.

It carries the study's :class:`~mpsearch.plan.Plan` — the one plan format — with every layer's
choice written out in full (``bits``, ``group_size``, ``symmetric``, ``method``: ``rtn``, ``gptq``,
or ``fp16`` at 16 bits), plus what a reader needs beside it:

* ``layers``: per layer, in the model's order, its ``name``, ``kind``, weight ``shape``, the matrix
  ``rows``×``cols`` it is quantized as, its exact ``bytes``, any ``aliases`` (other module names
  that share the weight) and the ``rule`` a ragged layer took;
* ``totals``: ``bytes`` (= bytes(plan), the tensor bytes of ``model.safetensors``),
  ``quantized_bytes``, ``other_bytes``, ``bpw`` and ``n_weights``;
* ``provenance``: the model source and digest, the calibration and evaluation data digests, the
  study, trial number and its loss, the budget, the mpsearch version, and ``refinement`` (the
  losses before and after ``export --refine sequential``, and whether its weights were kept);
* ``files``: the size and sha256 of ``model.safetensors``, checked on load.

Readers accept the ``format_version`` they know (2; version 1, written by mpsearch 0.1.0, is
read too) and refuse others with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from mpsearch.errors import MPSearchError
from mpsearch.plan import LayerChoice, Plan

PLAN_FORMAT = "mpsearch-plan"
PLAN_VERSION = 2


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerEntry(_Doc):
    name: str
    kind: str
    shape: list[int]
    rows: int
    cols: int
    bytes: int
    aliases: list[str] = []
    rule: str | None = None


class Totals(_Doc):
    bytes: int
    quantized_bytes: int
    other_bytes: int
    bpw: float
    n_weights: int


class ModelInfo(_Doc):
    source: str
    base_dir: str
    digest: str
    dtype: str
    architecture: str


class DataInfo(_Doc):
    source: str
    calibration_digest: str
    evaluation_digest: str
    test_digest: str | None = None  # mpsearch 0.1 exports have no test split


class Provenance(_Doc):
    model: ModelInfo
    data: DataInfo
    study: str
    trial: int
    trial_source: str | None
    loss: float  # on the evaluation split, the one the search selected on
    test_loss: float | None = None  # on the test split, never searched on
    loss_kind: str
    budget_bytes: int | None
    scheme: dict
    mpsearch_version: str
    created_at: str
    refinement: Refinement | None = None  # export --refine; the file holds the refined weights when kept
    repair: Refinement | None = None  # export --repair, after any refinement; its tuned scales and norms when kept


class Refinement(_Doc):
    """What ``export --refine`` or ``--repair`` did: the losses before and after, and whether the
    new weights were kept (only when the evaluation loss went down)."""

    method: str  # "sequential-gptq", "sequential-gptq+blockwise" or "repair"
    kept: bool
    loss_before: float
    loss_after: float
    test_loss_before: float | None = None
    test_loss_after: float | None = None
    seconds: float
    steps: int | None = None  # repair: Adam steps over the calibration batches; blockwise: steps a block
    seed: int | None = None  # repair, blockwise: torch.manual_seed before the first step
    hidden: float | None = None  # repair: the weight of the hidden-state term (export.repair_hidden); 0 or None: the study's loss alone
    examples: int | None = None  # repair, blockwise: how many examples it tuned on (export.repair_examples, or the calibration split's)
    lr: float | None = None  # repair: the learning rate on the scale gains (export.repair_lr)
    schedule: str | None = None  # repair: "constant" or "cosine" (export.repair_schedule)


class FileInfo(_Doc):
    bytes: int
    tensor_bytes: int
    sha256: str


class PlanDocument(_Doc):
    format: Literal["mpsearch-plan"] = PLAN_FORMAT
    format_version: Literal[2] = PLAN_VERSION
    plan: Plan
    layers: list[LayerEntry]
    totals: Totals
    provenance: Provenance
    files: dict[str, FileInfo]

    def entries(self) -> list[tuple[LayerEntry, LayerChoice]]:
        """Each layer's geometry with its choice, in the model's order."""
        return [(entry, self.plan[entry.name]) for entry in self.layers]

    def to_json(self) -> dict:
        rest = self.model_dump(mode="json", exclude={"format", "format_version", "plan"})
        return {"format": self.format, "format_version": self.format_version, "plan": self.plan.to_json(), **rest}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> "PlanDocument":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MPSearchError(f"{str(path.parent)!r} has no plan.json; point at a folder written by `mpsearch export`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MPSearchError(f"{str(path)!r} is not readable JSON ({e}); export the study again") from None
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise MPSearchError(f"{str(path)!r} is not an mpsearch plan (format {raw.get('format') if isinstance(raw, dict) else None!r}); export the study again")
        if raw.get("format_version") == 1:
            raw = _from_version_1(raw)
        if raw.get("format_version") != PLAN_VERSION:
            raise MPSearchError(
                f"{str(path)!r} has plan format_version {raw.get('format_version')!r}; this mpsearch reads {PLAN_VERSION}: "
                "use the mpsearch that wrote it, or export again"
            )
        try:
            plan = Plan.from_json(raw.get("plan"), where=f"{str(path)!r}'s plan")
            doc = cls.model_validate({**raw, "plan": plan})
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise MPSearchError(f"{str(path)!r}: {where}: {first['msg']}; export the study again") from None
        missing = [entry.name for entry in doc.layers if entry.name not in doc.plan]
        if missing or len(doc.plan) != len(doc.layers):
            raise MPSearchError(f"{str(path)!r}: its plan and its layers name different layers; export the study again")
        return doc


_CHOICE = ("bits", "group_size", "symmetric", "method")


def _from_version_1(raw: dict) -> dict:
    """mpsearch 0.1.0's plan.json (each layer's choice inside its entry) as version 2."""
    layers = raw.get("layers")
    if not isinstance(layers, list) or not all(isinstance(e, dict) and "name" in e for e in layers):
        return raw  # left for validation to name what is wrong
    choices = {e["name"]: {k: e[k] for k in _CHOICE if e.get(k) is not None} for e in layers}
    geometry = [{k: v for k, v in e.items() if k not in _CHOICE} for e in layers]
    return {**raw, "format_version": PLAN_VERSION, "plan": {"format_version": 1, "layers": choices}, "layers": geometry}
