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
6. rename into place (``force`` replaces an earlier export or an empty folder, never a folder
   holding anything else; the old one is kept until the new one is in) and record the export,
   with every file's sha256, in the database.

The temporary folder is made before any work, so a folder that cannot be written is reported
at once; it is removed on any failure, and one left by a killed export is removed by the next.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from glob import escape as glob_escape
from pathlib import Path

import torch

from mpsearch.errors import MPSearchError
from mpsearch.export import configs
from mpsearch.export.document import DataInfo, FileInfo, LayerEntry, ModelInfo, PlanDocument, Provenance, Refinement, Totals
from mpsearch.export.targets import TARGETS
from mpsearch.export.loader import MODEL_FILE, PLAN_FILE, TENSOR_FORMAT, TENSOR_VERSION, ExportError, load_quantized, sha256_of
from mpsearch.plan import FLOAT_BITS, LayerChoice, Plan
from mpsearch.quant.apply import packed_tensors
from mpsearch.storage.lease import pid_alive

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
    test_loss: float | None = None
    targets: dict[str, dict] = field(default_factory=dict)  # target -> what it wrote (TargetReport.to_json)
    refinement: dict | None = None  # export --refine: losses before and after, and whether it was kept
    repair: dict | None = None  # export --repair: the same

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "study": self.study,
            "trial": self.trial,
            "loss": self.loss,
            "test_loss": self.test_loss,
            "verified_loss": self.verified_loss,
            "bytes": self.bytes,
            "bpw": self.bpw,
            "export_id": self.export_id,
            "files": [{"name": n, "size": s, "sha256": h} for n, s, h in self.files],
            "targets": self.targets,
            "refinement": self.refinement,
            "repair": self.repair,
        }


def choose_trial(log, trial: int | None = None, pareto_index: int | None = None):
    """The trial to export: ``trial``, the ``pareto_index``-th of the front (smallest first), or the best."""
    complete = {r.number: r for r in log.complete()}
    if not complete:
        raise MPSearchError(f"study {log.name!r} has no completed trial to export; run or resume its search first")
    if trial is not None and pareto_index is not None:
        raise MPSearchError("give --trial or --pareto-index, not both")
    if trial is not None:
        if trial not in complete:
            raise MPSearchError(f"trial {trial} of study {log.name!r} is not a completed trial; `mpsearch trials {log.name}` lists them")
        return complete[trial]
    if pareto_index is not None:
        if log.objectives < 2:
            raise MPSearchError(f"study {log.name!r} has one objective, so no Pareto front; use --trial N or leave both out for the best")
        front = log.front()
        if not 0 <= pareto_index < len(front):
            raise MPSearchError(f"--pareto-index {pareto_index} is out of range: the front has {len(front)} trials (0 is the smallest)")
        return front[pareto_index]
    best = log.best()
    if best is None:
        raise MPSearchError(f"no completed trial of study {log.name!r} fits its budget; pick one with --trial N")
    return best


def study_spec(log, spec=None):
    """The spec the study ran with: ``spec`` if given (and it matches), else the one stored with it."""
    from mpsearch.spec import Spec

    meta = log.meta
    if spec is None:
        if "spec" not in meta:
            raise MPSearchError(f"study {log.name!r} does not record its spec (made by an older mpsearch); pass --spec SPEC, the spec it ran with")
        raw = dict(meta["spec"])
        # A study made before layers.unseen existed searched every layer: that is "search".
        raw["layers"] = {"unseen": "search", **(raw.get("layers") or {})}
        spec = Spec.from_dict(raw, base_dir=Path(meta["base_dir"]))
    if meta.get("spec_digest") not in (None, spec.digest()):
        raise MPSearchError(f"the spec differs from the one study {log.name!r} ran with (model, data, loss, quant or layers); pass the spec it ran with")
    return spec


@dataclass
class _Built:
    """What an export writes, before anything is written."""

    plan: Plan  # every choice resolved
    tensors: dict[str, torch.Tensor]
    tensor_bytes: int
    entries: list[LayerEntry]
    header: dict[str, str]


def export_study(
    storage,
    study_name: str,
    out: str | Path,
    *,
    trial: int | None = None,
    pareto_index: int | None = None,
    spec=None,
    device: str | torch.device | None = None,
    force: bool = False,
    verify: bool = True,
    progress: bool = False,
    target: str = "mpsearch",
    refine: str | None = None,
    repair_steps: int = 0,
) -> ExportResult:
    """Export one trial of ``study_name``; see the module docstring. ``target`` adds a
    deployment format beside mpsearch's own (:mod:`mpsearch.export.targets`). ``refine =
    "sequential"`` re-quantizes the plan in forward order (:mod:`mpsearch.quant.refine`) and
    keeps the result only if its evaluation loss is lower than the trial's; None takes the spec's
    ``export.refine``. ``repair_steps > 0`` then tunes scales, norms and biases by distillation on
    the calibration split (:mod:`mpsearch.quant.repair`), kept only if the evaluation loss drops."""
    from mpsearch.storage.trials import TrialLog
    from mpsearch.workload import Workload

    if target not in TARGETS:
        raise MPSearchError(f"--target {target!r} is not a deployment target; choose one of {', '.join(TARGETS)}")
    if refine is not None and refine not in REFINEMENTS:
        raise MPSearchError(f"--refine {refine!r} is not a refinement; choose one of {', '.join(REFINEMENTS)}")
    out = Path(out).absolute()
    _check_out(out, force)
    log = TrialLog.open(storage, study_name)
    chosen = choose_trial(log, trial, pareto_index)
    if chosen.plan is None:
        raise MPSearchError(f"trial {chosen.number} of study {study_name!r} records no plan; pick another with --trial N")
    tmp = _staging(out)  # before any work: a folder that cannot be written is found at once
    try:
        workload = Workload(study_spec(log, spec), device=device)
        if workload.spec.target.format == "gguf":
            return _export_gguf(storage, tmp, out, workload, log, chosen, target, refine, repair_steps, verify, progress)
        study_target = workload.spec.target.format
        if study_target != "mpsearch" and target != "mpsearch":
            raise ExportError(f"study {study_name!r} counted its layers in the {study_target} layout (target.format); its export is that layout's folder: drop --target {target}")
        packed = tmp if study_target == "mpsearch" else tmp / ".mpsearch"  # the ct folder is written from mpsearch's own export
        packed.mkdir(exist_ok=True)
        refine = refine or workload.spec.export.refine
        if repair_steps or refine == "blockwise":
            workload.batches("repair")  # an export.repair_examples the data cannot give is refused before any work
        built = _build(workload, chosen, progress)
        test_loss = _test_loss(workload, chosen.plan)
        refinement = None
        if refine in ("sequential", "blockwise"):
            built, refinement = _refine(workload, built, chosen, test_loss, progress, blockwise=refine == "blockwise")
        expected = refinement.loss_after if refinement is not None and refinement.kept else chosen.loss
        expected_test = refinement.test_loss_after if refinement is not None and refinement.kept else test_loss
        repaired = None
        if repair_steps:
            built, repaired = _repair(workload, built, expected, expected_test, repair_steps, progress)
            if repaired.kept:
                expected = repaired.loss_after
        doc = _write_folder(packed, built, workload, log, chosen, test_loss, refinement, repaired)
        verified = _verify(packed, workload, chosen, expected) if verify else None
        targets = {}
        if study_target == "compressed-tensors":
            doc, targets[study_target] = _compressed_tensors_study(tmp, packed, doc, workload, log, chosen, verify)
        elif target == "compressed-tensors":
            doc, targets[target] = _compressed_tensors(tmp, doc, workload, verify)
        for info in targets.values():  # where the folder will be, not the staging folder it was written in
            info["folder"] = str(out / Path(info["folder"]).relative_to(tmp))
        files = [
            (p.relative_to(tmp).as_posix(), p.stat().st_size, doc.files[MODEL_FILE].sha256 if p.name == MODEL_FILE and p.parent == tmp else sha256_of(p))
            for p in sorted(tmp.rglob("*")) if p.is_file()
        ]
        losses = {
            "loss": chosen.loss, "test_loss": test_loss, "verified_loss": verified,
            **({"refinement": refinement.model_dump(mode="json")} if refinement is not None else {}),
            **({"repair": repaired.model_dump(mode="json")} if repaired is not None else {}),
        }
        export_id = _publish(storage, tmp, out, study_name, chosen.number, chosen.plan, doc.totals.bytes, doc.totals.bpw, files, losses)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(
        out, study_name, chosen.number, chosen.loss, verified, doc.totals.bytes, doc.totals.bpw, export_id, files, test_loss, targets,
        refinement.model_dump(mode="json") if refinement is not None else None, repaired.model_dump(mode="json") if repaired is not None else None,
    )


REFINEMENTS = ("none", "sequential", "blockwise")


def _export_gguf(storage, tmp: Path, out: Path, workload, log, chosen, target: str, refine: str | None, repair_steps: int, verify: bool, progress: bool) -> ExportResult:
    """A gguf-target study's export (:mod:`mpsearch.export.targets.gguf`): ``model.gguf`` with the
    plan's llama.cpp types, checked by reading it back and (``verify``) by llama-embedding."""
    from mpsearch.export.targets import gguf as target_gguf
    from mpsearch.workload.data import split

    study = log.name
    if target != "mpsearch":
        raise ExportError(f"study {study!r} searched llama.cpp's types (target.format = \"gguf\"); its export is a GGUF: drop --target {target}")
    if (refine or "none") != "none" or repair_steps:
        raise ExportError(f"study {study!r} searched llama.cpp's types; --refine and --repair change mpsearch's packing, not llama.cpp's blocks: drop them")
    table = workload.layer_table()
    plan = chosen.plan
    nbytes, bank = _checked_bank(workload, chosen, progress, "the model or llama.cpp changed")
    test_loss = _test_loss(workload, plan)
    report = target_gguf.write(tmp, workload, plan, bank)
    texts = split(workload.spec.data, workload.spec.resolve)[1].texts if verify else None
    if texts and workload.is_causal_lm:
        report.perplexity = target_gguf.check_perplexity(tmp / target_gguf.FILE, workload, plan, bank, texts)
    elif texts:
        report.embedding = target_gguf.check_embeddings(tmp / target_gguf.FILE, workload, plan, bank, texts)
    resolved = Plan(layers={name: LayerChoice(bits=b, method="llama.cpp", type=table.type_of(name, b)) for name, b in plan.bits().items()})
    entries = [
        LayerEntry(name=l.name, kind=l.kind, shape=list(l.shape), rows=l.rows, cols=l.cols, bytes=table.layer_bytes(l.name, plan[l.name].bits), aliases=list(l.aliases), rule=l.rule)
        for l in table.layers
    ]
    model_path = tmp / target_gguf.FILE
    doc = PlanDocument(
        plan=resolved,
        layers=entries,
        totals=Totals(bytes=nbytes, quantized_bytes=table.quantized_bytes(plan), other_bytes=table.other_bytes, bpw=table.bpw(plan), n_weights=table.n_weights),
        provenance=_provenance(workload, log, chosen, test_loss),
        files={target_gguf.FILE: FileInfo(bytes=model_path.stat().st_size, tensor_bytes=report.tensor_bytes, sha256=sha256_of(model_path))},
    )
    doc.write(tmp / PLAN_FILE)
    baselines = {k: v for k, v in log.outcome().baselines.items() if k != chosen.source}
    (tmp / "README.md").write_text(configs.readme_summary(doc, baselines) + target_gguf.readme_section(report, doc), encoding="utf-8")
    for p in tmp.rglob("*"):
        os.chmod(p, 0o666 & ~_umask())
    files = [(p.relative_to(tmp).as_posix(), p.stat().st_size, sha256_of(p)) for p in sorted(tmp.rglob("*")) if p.is_file()]
    export_id = _publish(storage, tmp, out, study, chosen.number, chosen.plan, nbytes, doc.totals.bpw, files, {"loss": chosen.loss, "test_loss": test_loss})
    return ExportResult(out, study, chosen.number, chosen.loss, None, nbytes, doc.totals.bpw, export_id, files, test_loss, {"gguf": report.to_json()})


def _refine(workload, built: _Built, chosen, test_loss: float | None, progress: bool, blockwise: bool = False) -> tuple[_Built, Refinement]:
    """Sequential GPTQ of the plan (:mod:`mpsearch.quant.refine`), and with ``blockwise`` the
    block-wise learned rounding after it (:mod:`mpsearch.quant.blockwise`), scored on the
    evaluation and test splits; its tensors replace the bank's only when the evaluation loss went down."""
    from mpsearch.quant.blockwise import blockwise_forms
    from mpsearch.quant.refine import sequential_forms

    start = time.perf_counter()
    has_test = bool(workload.batches("test"))
    workload.reference("evaluation")  # from the FP model, before any weight changes
    if has_test:
        workload.reference("test")
    model = workload.build_model()
    table = workload.layer_table()
    bits = table.check_plan(built.plan)
    forms, methods = sequential_forms(model, table, bits, workload.calibration_batches(), workload.forward, progress)
    steps = examples = seed = None
    if blockwise:
        batches = workload.batches("repair")
        steps, seed = workload.spec.export.blockwise_steps, workload.spec.search.seed
        examples = sum(len(next(iter(b.values()))) for b in batches)
        forms = blockwise_forms(model, workload.fp_model(), table, bits, forms, batches, workload.forward, steps, seed=seed, progress=progress)
    after = workload.loss(model)
    refinement = Refinement(
        method="sequential-gptq" + ("+blockwise" if blockwise else ""), kept=after < chosen.loss, loss_before=chosen.loss, loss_after=after,
        test_loss_before=test_loss, test_loss_after=workload.loss(model, "test") if has_test else None, seconds=time.perf_counter() - start,
        steps=steps, seed=seed, examples=examples,
    )
    del model
    if not refinement.kept:
        return built, refinement
    tensors = dict(built.tensors)
    for name, form in forms.items():
        for suffix, t in form.items():
            key = f"{name}.{suffix}"
            old = tensors[key]
            assert t.shape == old.shape and t.dtype == old.dtype, key  # the same layout: bytes(plan) unchanged
            tensors[key] = t
    plan = Plan(layers={name: c.model_copy(update={"method": methods[name]}) for name, c in built.plan.layers.items()})
    return _Built(plan, tensors, built.tensor_bytes, built.entries, built.header), refinement


def _repair(workload, built: _Built, loss: float, test_loss: float | None, steps: int, progress: bool) -> tuple[_Built, Refinement]:
    """A short distillation of the plan's scales, norms and biases (:mod:`mpsearch.quant.repair`),
    from what the export holds now; its tensors replace those only when the evaluation loss drops."""
    from mpsearch.quant.repair import decode_into, hidden_distance, repair

    table = workload.layer_table()
    bits = table.check_plan(built.plan)  # menu entries: a scheme option's layer decodes in its own groups
    forms = {layer.name: {k.removeprefix(layer.name + "."): t for k, t in built.tensors.items() if k.rsplit(".", 1)[0] == layer.name and k.rsplit(".", 1)[1] in _FORM_KEYS} for layer in table.layers}
    has_test = bool(workload.batches("test"))
    for split in ("repair", "evaluation", *(("test",) if has_test else ())):
        workload.reference(split)  # from the FP model, before any weight changes

    weight = workload.spec.export.repair_hidden
    fp = workload.fp_model() if weight else None

    def step_loss(model, index: int):
        if not weight:
            total, count = workload.loss_terms(model, "repair", index)
            return total / count
        batch = workload.batches("repair")[index]
        outputs, hidden = workload.forward_hidden(model, batch)
        total, count = workload.loss_fn(outputs, workload.reference("repair")[index], batch)
        if hidden is None:
            return total / count
        with torch.no_grad():  # the FP model's, batch by batch: held, they would take a causal LM's memory many times over
            _, reference = workload.forward_hidden(fp, batch)
        return total / count + weight * hidden_distance(hidden, reference, batch.get("attention_mask"))

    seed = workload.spec.search.seed
    settings = workload.spec.export
    done = repair(
        workload.build_model(), table, bits, forms, step_loss, len(workload.batches("repair")), steps,
        seed=seed, lr=settings.repair_lr, schedule=settings.repair_schedule, progress=progress,
    )
    model = decode_into(workload.build_model(), table, bits, done.forms)
    model.load_state_dict(done.tensors, strict=False)
    after = workload.loss(model)
    result = Refinement(
        method="repair", kept=after < loss, loss_before=loss, loss_after=after, test_loss_before=test_loss,
        test_loss_after=workload.loss(model, "test") if has_test else None, seconds=done.seconds, steps=len(done.curve), seed=seed,
        hidden=weight, examples=sum(len(next(iter(b.values()))) for b in workload.batches("repair")), lr=settings.repair_lr, schedule=settings.repair_schedule,
    )
    if not result.kept:
        return built, result
    tensors = dict(built.tensors)
    for name, form in done.forms.items():
        for suffix, t in form.items():
            key = f"{name}.{suffix}"
            assert t.shape == tensors[key].shape and t.dtype == tensors[key].dtype, key
            tensors[key] = t
    for name, t in done.tensors.items():
        if name in tensors:  # a tied tensor is stored once, under its first name
            tensors[name] = t.to(tensors[name].dtype)
    return _Built(built.plan, tensors, built.tensor_bytes, built.entries, built.header), result


_FORM_KEYS = {"qweight", "scales", "zeros", "weight"}


def _compressed_tensors(tmp: Path, doc: PlanDocument, workload, verify: bool) -> tuple[PlanDocument, dict]:
    """Write ``tmp/compressed-tensors/`` from the export just written (loaded back by mpsearch's
    loader), check transformers' outputs against it, and record its model file in plan.json."""
    from mpsearch.export.targets import compressed_tensors as ct

    quantized = load_quantized(tmp, workload.build_model(), device=workload.device)
    report = ct.write(tmp / ct.FOLDER, doc, quantized, workload.fp_model(), workload.loaded.tokenizer)
    if verify:
        report.max_rel_diff = ct.check(tmp / ct.FOLDER, quantized, workload)
    model_file = tmp / ct.FOLDER / MODEL_FILE
    os.chmod(model_file, 0o666 & ~_umask())
    info = FileInfo(bytes=model_file.stat().st_size, tensor_bytes=report.tensor_bytes, sha256=sha256_of(model_file))
    doc = doc.model_copy(update={"files": {**doc.files, f"{ct.FOLDER}/{MODEL_FILE}": info}})
    doc.write(tmp / PLAN_FILE)
    with (tmp / "README.md").open("a", encoding="utf-8") as f:
        f.write(ct.readme_section(report, doc))
    return doc, report.to_json()


def _compressed_tensors_study(tmp: Path, packed: Path, doc: PlanDocument, workload, log, chosen, verify: bool) -> tuple[PlanDocument, dict]:
    """A compressed-tensors study's export: the Hugging Face folder itself in ``tmp`` (config.json,
    model.safetensors in compressed-tensors' layout, the tokenizer), with plan.json and README.md.
    It is written from mpsearch's own export in ``packed`` (built, refined, repaired and verified
    as always; then removed); its tensor bytes must be bytes(plan) of the study's ledger, and
    transformers' outputs those of mpsearch's loader."""
    from mpsearch.export.targets import compressed_tensors as ct

    table = workload.layer_table()
    quantized = load_quantized(packed, workload.build_model(), device=workload.device)
    report = ct.write(tmp, doc, quantized, workload.fp_model(), workload.loaded.tokenizer)
    nbytes = table.bytes(doc.plan)
    if report.tensor_bytes != nbytes:  # the ledger the search budgeted against is the folder's, exactly
        raise ExportError(f"the compressed-tensors folder holds {report.tensor_bytes} tensor bytes but the plan costs {nbytes}; report this")
    if verify:
        report.max_rel_diff = ct.check(tmp, quantized, workload)
    del quantized
    shutil.rmtree(packed)
    model_file = tmp / MODEL_FILE
    os.chmod(model_file, 0o666 & ~_umask())  # like the other files, not a temporary file's 0600
    config_file = tmp / ct.CONFIG_FILE
    widths = table.check_plan(doc.plan)
    doc = doc.model_copy(update={
        "layers": [e.model_copy(update={"bytes": table.layer_bytes(e.name, widths[e.name])}) for e in doc.layers],
        "totals": Totals(bytes=nbytes, quantized_bytes=table.quantized_bytes(doc.plan), other_bytes=table.other_bytes, bpw=table.bpw(doc.plan), n_weights=table.n_weights),
        "files": {
            MODEL_FILE: FileInfo(bytes=model_file.stat().st_size, tensor_bytes=report.tensor_bytes, sha256=sha256_of(model_file)),
            ct.CONFIG_FILE: FileInfo(bytes=config_file.stat().st_size, tensor_bytes=0, sha256=sha256_of(config_file)),
        },
    })
    doc.write(tmp / PLAN_FILE)
    baselines = {k: v for k, v in log.outcome().baselines.items() if k != chosen.source}
    (tmp / "README.md").write_text(configs.readme_summary(doc, baselines) + ct.readme_section(report, doc, here=True), encoding="utf-8")
    report.folder = tmp
    return doc, report.to_json()


def _test_loss(workload, plan: Plan) -> float | None:
    """The plan's loss on the test split, the split no trial was selected on (None: no test split)."""
    if not workload.batches("test"):
        return None
    bank = workload.candidate_bank(_widths(workload.layer_table(), plan))
    workload.reference("test")  # from the FP weights, before any candidate is swapped in
    model = workload.fp_model()
    with bank.applied(model, plan):
        return workload.loss(model, "test")


def _checked_bank(workload, chosen, progress: bool, changed: str):
    """The plan's bytes and the bank holding its candidates, once the plan is one for this model
    and costs the bytes its trial recorded (else: ``changed`` says what must have)."""
    table = workload.layer_table()
    plan = chosen.plan
    if plan.names() != table.names:
        raise ExportError(f"trial {chosen.number}'s plan names other layers than the model of the spec: the study ran on another model")
    nbytes = table.bytes(plan)
    if chosen.bytes not in (None, nbytes):
        raise ExportError(f"the plan costs {nbytes} bytes on this model but the trial recorded {chosen.bytes}: {changed}")
    return nbytes, workload.candidate_bank(_widths(table, plan), progress=progress)


def _widths(table, plan: Plan) -> list:
    """The menu entries ``plan`` uses (bits, scheme options), in the menu's order."""
    used = set(table.check_plan(plan).values())
    return [w for w in table.menu if w in used]


def _packing(table):
    """The ledger of mpsearch's own file for ``table``'s layers (a compressed-tensors study counts
    its layers at that library's bytes, but its export is written from mpsearch's file first)."""
    return table if table.target == "mpsearch" else replace(table, target="mpsearch")


def _build(workload, chosen, progress: bool) -> _Built:
    """The plan's tensors from the candidate bank (the very codes the trial evaluated), checked
    against the model and the bytes the trial recorded."""
    table = _packing(workload.layer_table())
    plan = chosen.plan
    _, bank = _checked_bank(workload, chosen, progress, "the model or scheme changed")
    tensors = packed_tensors(workload.fp_model(), bank, plan)  # written one at a time, to the host as they go
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert tensor_bytes == table.bytes(plan), (tensor_bytes, table.bytes(plan))  # DESIGN.md's contract; the ledger and the tensors agree
    resolved = _resolved(table, plan, bank)
    widths = table.check_plan(plan)
    entries = [
        LayerEntry(name=l.name, kind=l.kind, shape=list(l.shape), rows=l.rows, cols=l.cols, bytes=table.layer_bytes(l.name, widths[l.name]), aliases=list(l.aliases), rule=l.rule)
        for l in (table.at(name, widths[name])[0] for name in table.names)  # a scheme option's layer: its own group rule
    ]
    layers_meta = [
        {"name": e.name, "kind": e.kind, "bits": c.bits, "rows": e.rows, "cols": e.cols, "group_size": c.group_size, "symmetric": c.symmetric, "shape": e.shape}
        for e, c in ((e, resolved[e.name]) for e in entries)
    ]
    header = {
        "format": TENSOR_FORMAT, "format_version": TENSOR_VERSION, "layers": json.dumps(layers_meta),
        "shared": json.dumps(_shared_names(workload.fp_model(), tensors)),
    }
    return _Built(resolved, tensors, tensor_bytes, entries, header)


def _write_folder(
    tmp: Path, built: _Built, workload, log, chosen, test_loss: float | None = None, refinement: Refinement | None = None, repaired: Refinement | None = None,
) -> PlanDocument:
    """``model.safetensors``, ``plan.json`` and the deployment configs, in ``tmp``."""
    from mpsearch.quant.tensorfile import save_tensors

    table = _packing(workload.layer_table())
    model_path = tmp / MODEL_FILE
    save_tensors(built.tensors, model_path, built.header)
    os.chmod(model_path, 0o666 & ~_umask())  # like the other files, not the 0600 of a temporary file
    doc = PlanDocument(
        plan=built.plan,
        layers=built.entries,
        totals=Totals(
            bytes=table.bytes(built.plan), quantized_bytes=table.quantized_bytes(built.plan), other_bytes=table.other_bytes,
            bpw=table.bpw(built.plan), n_weights=table.n_weights,
        ),
        provenance=_provenance(workload, log, chosen, test_loss, refinement, repaired),
        files={MODEL_FILE: FileInfo(bytes=model_path.stat().st_size, tensor_bytes=built.tensor_bytes, sha256=sha256_of(model_path))},
    )
    doc.write(tmp / PLAN_FILE)
    shutil.copyfile(FORMAT_DOC, tmp / "FORMAT.md")
    unplanned = _unplanned(workload.fp_model(), table)
    llama, unnamed = configs.llama_cpp_tensor_types(doc, unplanned)
    (tmp / "llama_cpp_tensor_types.txt").write_text(llama, encoding="utf-8")
    (tmp / "quantization_config.json").write_text(json.dumps(configs.quantization_config(doc, unplanned), indent=2) + "\n", encoding="utf-8")
    baselines = {k: v for k, v in log.outcome().baselines.items() if k != chosen.source}
    (tmp / "README.md").write_text(configs.readme(doc, baselines, unnamed), encoding="utf-8")
    return doc


def _unplanned(model, table) -> dict[str, str]:
    """Each weight-matrix module the plan leaves alone (excluded, unseen, embeddings), with the dtype
    the export keeps it in: the deployment configs state them too."""
    from mpsearch.quant.layers import Conv1D

    planned = {name for layer in table.layers for name in (layer.name, *layer.aliases)}
    kinds = (torch.nn.Linear, torch.nn.Embedding) + ((Conv1D,) if Conv1D is not None else ())
    return {
        name: str(m.weight.dtype).removeprefix("torch.")
        for name, m in model.named_modules() if isinstance(m, kinds) and name not in planned
    }


def _verify(tmp: Path, workload, chosen, expected: float) -> float:
    """The export's loss, loaded back from its packed file; it must be ``expected`` (the trial's,
    or the refined weights' when a refinement was kept)."""
    verified = workload.loss(load_quantized(tmp, workload.build_model(), device=workload.device))
    if not math.isclose(verified, expected, rel_tol=VERIFY_RTOL, abs_tol=1e-12):
        what = f"trial {chosen.number}'s recorded {expected:.6g}" if expected == chosen.loss else f"the refined weights' {expected:.6g}"
        raise ExportError(
            f"the exported model's loss {verified:.6g} differs from {what}: "
            "the model or evaluation data changed since the study ran; nothing was written"
        )
    return verified


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What an export folder holds; --force replaces a folder with nothing else in it.
EXPORT_FILES = frozenset({MODEL_FILE, PLAN_FILE, "FORMAT.md", "llama_cpp_tensor_types.txt", "quantization_config.json", "README.md", "model.gguf", "imatrix.gguf"}) | frozenset({
    # a compressed-tensors study's: the Hugging Face folder's config and tokenizer files
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
})  # model.gguf, imatrix.gguf: a gguf study's
EXPORT_FOLDERS = frozenset(TARGETS) - {"mpsearch"}  # each other target writes a folder of its name


def _check_out(out: Path, force: bool) -> None:
    """``out`` may be new, an empty folder, or (with ``force``) an earlier export: never anything else."""
    if out.exists() and not out.is_dir():
        raise MPSearchError(f"--out {str(out)!r} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise MPSearchError(f"--out {str(out)!r} exists and is not empty; pass --force to replace it, or another folder")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not (p.name in EXPORT_FILES and p.is_file() or p.name in EXPORT_FOLDERS and p.is_dir()))
    if foreign or not _is_export(out / PLAN_FILE):
        what = f"holds {', '.join(foreign[:3])}{' and more' if len(foreign) > 3 else ''}" if foreign else "has no mpsearch plan.json"
        raise MPSearchError(
            f"--out {str(out)!r} {what}, so it is not an earlier export; --force replaces only an empty folder or an export: "
            "move those files or choose another folder"
        )


def _is_export(plan_file: Path) -> bool:
    try:
        PlanDocument.read(plan_file)
    except MPSearchError:
        return False
    return True


def _staging(out: Path) -> Path:
    """A new, empty folder beside ``out`` that the export is written into, then renamed to ``out``.

    Its name carries this process's id, so a later export can tell a folder left by a killed
    process (removed here) from one that another export is still writing.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        probe = tmp / ".probe"
        probe.write_bytes(b"")  # a folder can be created yet its files not (a full or read-only disk)
        probe.unlink()
    except OSError as e:
        raise MPSearchError(f"cannot write beside --out {str(out)!r} ({e.strerror or e}); choose a folder you can write to") from None
    return tmp


def _remove_stale(out: Path) -> None:
    for folder in out.parent.glob(f".{glob_escape(out.name)}.tmp-*"):
        pid = folder.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _publish(storage, tmp: Path, out: Path, study: str, trial: int, plan: Plan, nbytes: int, bpw: float, files, losses: dict | None = None) -> int:
    """Rename ``tmp`` to ``out`` and record it; on failure the old ``out`` (if any) is back in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    try:
        export_id = storage.record_export(study, trial, plan.to_json(), nbytes, bpw, str(out), files, losses)
    except BaseException:
        os.rename(out, tmp)  # the caller removes tmp
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return export_id


_GPTQ_ONLY = {"damp", "act_order"}  # settings of gptq alone: an rtn export does not list them


def _shared_names(model, stored: dict) -> dict[str, list[str]]:
    """``{stored name: [its other state-dict names]}`` for each stored tensor the model holds under
    several names (a tied, unquantized weight such as GPT-2's ``lm_head.weight``; a quantized
    layer's other names are its ``aliases`` in plan.json)."""
    from mpsearch.quant.layers import tensor_key

    names: dict[tuple, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(tensor_key(t), []).append(name)
    return {group[0]: group[1:] for group in names.values() if len(group) > 1 and group[0] in stored}


def _resolved(table, plan: Plan, bank) -> Plan:
    """``plan`` with every choice written out: bits, group size, symmetric, method (``fp16`` at 16 bits)."""
    widths = table.check_plan(plan)
    choices = {}
    for name in table.names:
        layer, scheme, bits = table.at(name, widths[name])  # a scheme option: its own group size and symmetry
        if bits == FLOAT_BITS:
            choices[layer.name] = LayerChoice(bits=bits, method="fp16")
        else:
            method = "rtn" if layer.name in bank.notes else scheme.method
            choices[layer.name] = LayerChoice(bits=bits, group_size=layer.group_size, symmetric=scheme.symmetric, method=method)
    return Plan(layers=choices)


def _provenance(workload, log, trial, test_loss: float | None = None, refinement: Refinement | None = None, repaired: Refinement | None = None) -> Provenance:
    from mpsearch import __version__
    from mpsearch.hashing import batches_digest, model_digest

    spec = workload.spec
    fp = workload.fp_model()
    return Provenance(
        model=ModelInfo(source=spec.model.source, base_dir=str(spec.base_dir), digest=model_digest(fp), dtype=spec.model.dtype, architecture=type(fp).__name__),
        data=DataInfo(
            source=spec.data.source,
            calibration_digest=batches_digest(workload.calibration_batches()),
            evaluation_digest=batches_digest(workload.evaluation_batches()),
            test_digest=batches_digest(workload.batches("test")) if workload.batches("test") else None,
        ),
        study=log.name,
        trial=trial.number,
        trial_source=trial.source,
        loss=trial.loss,
        test_loss=test_loss,
        loss_kind=spec.loss.kind,
        budget_bytes=log.meta.get("budget_bytes"),
        scheme=spec.quant.model_dump(mode="json", exclude=_GPTQ_ONLY if spec.quant.method != "gptq" else None),
        mpsearch_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        refinement=refinement,
        repair=repaired,
    )
