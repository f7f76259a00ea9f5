"""``plan.json``: the versioned document that says what an export holds and where it came from.

It is DESIGN.md's plan (an ordered mapping from layer name to bits, with each layer's
scheme) plus the totals and the provenance a deployment needs to trust the file:

* ``layers``: per layer, in the model's order, its ``name``, ``bits``, ``group_size``,
  ``symmetric``, ``method`` (``rtn``, ``gptq`` or ``fp16``), its weight ``shape``, the
  matrix ``rows``×``cols`` it is quantized as, its exact ``bytes`` and any ``aliases``
  (other module names that share the weight);
* ``totals``: ``bytes`` (= bytes(plan), the tensor bytes of ``model.safetensors``),
  ``quantized_bytes``, ``other_bytes``, ``bpw`` and ``n_weights``;
* ``provenance``: the model source and digest, the calibration and evaluation data
  digests, the study, trial number and its loss, the budget, and the mpsearch version;
* ``files``: the size and sha256 of ``model.safetensors``, checked on load.

Readers accept the ``format_version`` they know and refuse others with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mpsearch.errors import MPSearchError

PLAN_FORMAT = "mpsearch-plan"
PLAN_VERSION = 1


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerEntry(_Doc):
    name: str
    bits: Literal[2, 3, 4, 8, 16]
    group_size: int | None = Field(description="weights per scale along the input dimension; null at 16 bits")
    symmetric: bool | None = Field(description="null at 16 bits")
    method: Literal["rtn", "gptq", "fp16"]
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


class Provenance(_Doc):
    model: ModelInfo
    data: DataInfo
    study: str
    trial: int
    trial_source: str | None
    loss: float
    loss_kind: str
    budget_bytes: int | None
    scheme: dict
    mpsearch_version: str
    created_at: str


class FileInfo(_Doc):
    bytes: int
    tensor_bytes: int
    sha256: str


class PlanDocument(_Doc):
    format: Literal["mpsearch-plan"] = PLAN_FORMAT
    format_version: int = PLAN_VERSION
    layers: list[LayerEntry]
    totals: Totals
    provenance: Provenance
    files: dict[str, FileInfo]

    @property
    def plan(self) -> dict[str, int]:
        return {layer.name: layer.bits for layer in self.layers}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")

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
        if raw.get("format_version") != PLAN_VERSION:
            raise MPSearchError(
                f"{str(path)!r} has plan format_version {raw.get('format_version')!r}; this mpsearch reads {PLAN_VERSION}: "
                "use the mpsearch that wrote it, or export again"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise MPSearchError(f"{str(path)!r}: {where}: {first['msg']}; export the study again") from None
