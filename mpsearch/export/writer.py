"""``mpsearch export``: a study's chosen trial as a packed model, its plan and deployment configs.

The export is built in a temporary folder beside ``--out`` and renamed into place only
once it is complete and checked, so a failed or interrupted export leaves nothing behind
and a reader never sees half a folder:

1. pick the trial (the best within the budget, ``--trial N``, or ``--pareto-index K``);
2. rebuild the study's workload from the spec stored with the study, and check the model
   still has the study's layers and the plan still costs the bytes the trial recorded;
3. take the plan's packed tensors from the candidate bank (the very codes the trial
   evaluated) and write ``model.safetensors``; its tensor bytes are bytes(plan);
4. write ``plan.json``, ``FORMAT.md``, ``llama_cpp_tensor_types.txt``,
   ``quantization_config.json`` and ``README.md``;
5. load the folder back with :func:`load_quantized` and evaluate it: the loss must equal
   the trial's recorded loss to 1e-4 relative (``verify=False`` skips this);
6. rename into place (``force`` replaces an existing folder, which is kept until the new
   one is in) and record the export, with every file's sha256, in the database.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mpsearch.errors import MPSearchError
from mpsearch.export import configs
from mpsearch.export.loader import MODEL_FILE, PLAN_FILE, TENSOR_FORMAT, ExportError, load_quantized, sha256_of
from mpsearch.export.plan import PLAN_VERSION, DataInfo, FileInfo, LayerEntry, ModelInfo, PlanDocument, Provenance, Totals
from mpsearch.quant.apply import packed_tensors
from mpsearch.quant.scheme import FLOAT_BITS

FORMAT_DOC = Path(__file__).with_name("FORMAT.md")
VERIFY_RTOL = 1e-4


@dataclass
class ExportResult:
    out: Path
    study: str
    trial: int
    loss: float
    verified_loss: float | None
    bytes: int
    bpw: float
    export_id: int | None
    files: list[tuple[str, int, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "study": self.study,
            "trial": self.trial,
            "loss": self.loss,
            "verified_loss": self.verified_loss,
            "bytes": self.bytes,
            "bpw": self.bpw,
            "export_id": self.export_id,
            "files": [{"name": n, "size": s, "sha256": h} for n, s, h in self.files],
        }


def choose_trial(study, trial: int | None = None, pareto_index: int | None = None):
    """The trial to export: ``trial``, the ``pareto_index``-th of the front (smallest first), or the best."""
    from optuna.trial import TrialState

    from mpsearch.search.driver import outcome

    complete = {t.number: t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.values and math.isfinite(t.values[0])}
    if not complete:
        raise MPSearchError(f"study {study.study_name!r} has no completed trial to export; run or resume its search first")
    if trial is not None and pareto_index is not None:
        raise MPSearchError("give --trial or --pareto-index, not both")
    if trial is not None:
        if trial not in complete:
            raise MPSearchError(f"trial {trial} of study {study.study_name!r} is not a completed trial; `mpsearch trials {study.study_name}` lists them")
        return complete[trial]
    if pareto_index is not None:
        if len(study.directions) < 2:
            raise MPSearchError(f"study {study.study_name!r} has one objective, so no Pareto front; use --trial N or leave both out for the best")
        front = sorted(study.best_trials, key=lambda t: (t.user_attrs.get("bytes"), t.values[0]))
        if not 0 <= pareto_index < len(front):
            raise MPSearchError(f"--pareto-index {pareto_index} is out of range: the front has {len(front)} trials (0 is the smallest)")
        return front[pareto_index]
    best = outcome(study).best
    if best is None:
        raise MPSearchError(f"no completed trial of study {study.study_name!r} fits its budget; pick one with --trial N")
    return complete[best["trial"]]


def study_spec(study, spec=None):
    """The spec the study ran with: ``spec`` if given (and it matches), else the one stored with it."""
    from mpsearch.hashing import json_digest
    from mpsearch.search.driver import STUDY_ATTR
    from mpsearch.spec import Spec

    meta = study.user_attrs.get(STUDY_ATTR) or {}
    if spec is None:
        if "spec" not in meta:
            raise MPSearchError(f"study {study.study_name!r} does not record its spec (made by an older mpsearch); pass --spec SPEC, the spec it ran with")
        spec = Spec.from_dict(meta["spec"], base_dir=Path(meta["base_dir"]))
    digest = json_digest({k: spec.model_dump(mode="json")[k] for k in ("model", "data", "loss", "quant", "layers")})
    if meta.get("spec_digest") not in (None, digest):
        raise MPSearchError(f"the spec differs from the one study {study.study_name!r} ran with (model, data, loss, quant or layers); pass the spec it ran with")
    return spec


def export_study(
    storage,
    study_name: str,
    out: str | Path,
    *,
    trial: int | None = None,
    pareto_index: int | None = None,
    spec=None,
    device: str | torch.device = "cpu",
    force: bool = False,
    verify: bool = True,
    progress: bool = False,
) -> ExportResult:
    """Export one trial of ``study_name``; see the module docstring."""
    from mpsearch.search.driver import outcome
    from mpsearch.storage.store import ATTR_BYTES, ATTR_PLAN
    from mpsearch.storage.studies import load_study
    from mpsearch.workload import Workload

    out = Path(out).absolute()
    _check_out(out, force)
    study = load_study(storage, study_name)
    chosen = choose_trial(study, trial, pareto_index)
    spec = study_spec(study, spec)
    plan = chosen.user_attrs.get(ATTR_PLAN)
    if not plan:
        raise MPSearchError(f"trial {chosen.number} of study {study_name!r} records no plan; pick another with --trial N")

    workload = Workload(spec, device=device)
    table = workload.layer_table()
    if list(plan) != table.names:
        raise ExportError(f"trial {chosen.number}'s plan names other layers than the model of the spec: the study ran on another model")
    nbytes = table.bytes(plan)
    if chosen.user_attrs.get(ATTR_BYTES) not in (None, nbytes):
        raise ExportError(f"the plan costs {nbytes} bytes on this model but the trial recorded {chosen.user_attrs[ATTR_BYTES]}: the model or scheme changed")

    bank = workload.candidate_bank(sorted(set(plan.values())), packed=True, progress=progress)
    fp = workload.fp_model()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in packed_tensors(fp, bank, plan).items()}
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert tensor_bytes == nbytes, (tensor_bytes, nbytes)  # DESIGN.md's contract; the ledger and the tensors agree

    budget = (study.user_attrs.get("mpsearch") or {}).get("budget_bytes")
    entries = _entries(table, plan, bank)
    header = {
        "format": TENSOR_FORMAT,
        "format_version": str(PLAN_VERSION),
        "layers": json.dumps([{k: e[k] for k in ("name", "bits", "rows", "cols", "group_size", "symmetric", "shape")} for e in entries]),
    }

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        model_path = tmp / MODEL_FILE
        save_file(tensors, str(model_path), metadata=header)
        os.chmod(model_path, 0o666 & ~_umask())  # like the other files, not the 0600 of a temporary file
        model_sha = sha256_of(model_path)
        doc = PlanDocument(
            layers=[LayerEntry(**e) for e in entries],
            totals=Totals(bytes=nbytes, quantized_bytes=table.quantized_bytes(plan), other_bytes=table.other_bytes, bpw=table.bpw(plan), n_weights=table.n_weights),
            provenance=_provenance(workload, study, chosen, budget),
            files={MODEL_FILE: FileInfo(bytes=model_path.stat().st_size, tensor_bytes=tensor_bytes, sha256=model_sha)},
        )
        doc.write(tmp / PLAN_FILE)
        shutil.copyfile(FORMAT_DOC, tmp / "FORMAT.md")
        llama, unnamed = configs.llama_cpp_tensor_types(doc)
        (tmp / "llama_cpp_tensor_types.txt").write_text(llama, encoding="utf-8")
        (tmp / "quantization_config.json").write_text(json.dumps(configs.quantization_config(doc), indent=2) + "\n", encoding="utf-8")
        baselines = {k: v for k, v in outcome(study).baselines.items() if k != chosen.user_attrs.get("source")}
        (tmp / "README.md").write_text(configs.readme(doc, baselines, unnamed), encoding="utf-8")

        verified = None
        if verify:
            verified = workload.loss(load_quantized(tmp, workload.build_model(), device=device))
            recorded = chosen.values[0]
            if not math.isclose(verified, recorded, rel_tol=VERIFY_RTOL, abs_tol=1e-12):
                raise ExportError(
                    f"the exported model's loss {verified:.6g} differs from trial {chosen.number}'s recorded {recorded:.6g}: "
                    "the model or evaluation data changed since the study ran; nothing was written"
                )
        files = [(p.name, p.stat().st_size, model_sha if p.name == MODEL_FILE else sha256_of(p)) for p in sorted(tmp.iterdir())]
        export_id = _publish(storage, tmp, out, study_name, chosen.number, plan, nbytes, table.bpw(plan), files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, study_name, chosen.number, chosen.values[0], verified, nbytes, table.bpw(plan), export_id, files)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MPSearchError(f"--out {str(out)!r} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MPSearchError(f"--out {str(out)!r} exists and is not empty; pass --force to replace it, or another folder")


def _publish(storage, tmp: Path, out: Path, study: str, trial: int, plan: dict, nbytes: int, bpw: float, files) -> int:
    """Rename ``tmp`` to ``out`` and record it; on failure the old ``out`` (if any) is back in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    try:
        export_id = storage.record_export(study, trial, plan, nbytes, bpw, str(out), files)
    except BaseException:
        os.rename(out, tmp)  # the caller removes tmp
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return export_id


def _entries(table, plan: dict, bank) -> list[dict[str, Any]]:
    scheme = table.scheme
    rows = []
    for layer in table.layers:
        bits = plan[layer.name]
        quantized = bits != FLOAT_BITS
        method = "fp16" if not quantized else ("rtn" if layer.name in bank.notes else scheme.method)
        rows.append(
            {
                "name": layer.name,
                "bits": bits,
                "group_size": layer.group_size if quantized else None,
                "symmetric": scheme.symmetric if quantized else None,
                "method": method,
                "kind": layer.kind,
                "shape": list(layer.shape),
                "rows": layer.rows,
                "cols": layer.cols,
                "bytes": layer.bytes(bits, scheme),
                "aliases": list(layer.aliases),
                "rule": layer.rule,
            }
        )
    return rows


def _provenance(workload, study, trial, budget: int | None) -> Provenance:
    from mpsearch import __version__
    from mpsearch.hashing import batches_digest, model_digest

    spec = workload.spec
    fp = workload.fp_model()
    return Provenance(
        model=ModelInfo(
            source=spec.model.source,
            base_dir=str(spec.base_dir),
            digest=model_digest(fp),
            dtype=spec.model.dtype,
            architecture=type(fp).__name__,
        ),
        data=DataInfo(
            source=spec.data.source,
            calibration_digest=batches_digest(workload.calibration_batches()),
            evaluation_digest=batches_digest(workload.evaluation_batches()),
        ),
        study=study.study_name,
        trial=trial.number,
        trial_source=trial.user_attrs.get("source"),
        loss=trial.values[0],
        loss_kind=spec.loss.kind,
        budget_bytes=budget,
        scheme=spec.quant.model_dump(mode="json"),
        mpsearch_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
