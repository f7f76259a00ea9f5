"""``mpsearch eval DIR SPEC``: an export's loss, scored from its packed file on a spec's data."""

from __future__ import annotations

from pathlib import Path

from mpsearch.export.loader import ExportError, load_quantized, read_plan


def evaluate_export(folder: str | Path, workload) -> dict:
    """``{loss, bytes, bpw, trial, recorded_loss, model_bytes}`` of the export in ``folder``
    (``recorded_loss``: the trial's, or the refined weights' after ``export --refine``).

    The spec's model must be the one the export was made from (same weights digest): the
    loss compares the loaded model against that model's own outputs. ``model_bytes`` is
    what the loaded model holds in its tensors.
    """
    from mpsearch.hashing import model_digest

    doc = read_plan(folder)
    digest = model_digest(workload.fp_model())
    if digest != doc.provenance.model.digest:
        raise ExportError(
            f"{str(folder)!r} was exported from model {doc.provenance.model.source} ({doc.provenance.model.digest[:12]}) "
            f"but the spec's model is {workload.spec.model.source} ({digest[:12]}): the plan is for another model; pass the spec the study ran with"
        )
    model = load_quantized(folder, workload.build_model(), device=workload.device)
    return {
        "loss": workload.loss(model),
        "bytes": doc.totals.bytes,
        "bpw": doc.totals.bpw,
        "trial": doc.provenance.trial,
        "recorded_loss": _recorded(doc),
        "model_bytes": resident_bytes(model),
    }


def _recorded(doc) -> float:
    """The loss the export's weights were recorded at: after the last refinement or repair kept."""
    for step in (doc.provenance.repair, doc.provenance.refinement):
        if step is not None and step.kept:
            return step.loss_after
    return doc.provenance.loss


def resident_bytes(model) -> int:
    """Bytes of every parameter and buffer the model holds, a shared tensor once."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
