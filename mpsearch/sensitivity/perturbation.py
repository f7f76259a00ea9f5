"""Perturbation sensitivity: the calibration loss with one layer alone quantized.

``Δloss(l, b) = loss(W with layer l at b bits, every other layer FP) − loss(W)`` on the
calibration set. The (layer, bits) jobs are independent; they are spread over Ray actors
that each load the workload and the bank once (see :mod:`mpsearch.runtime`).
"""

from __future__ import annotations

from mpsearch.plan import Plan
from mpsearch.runtime import ScorerPool
from mpsearch.sensitivity.profile import SENSITIVITY, Method, Options


def perturbation_scores(workload, workers: int = 2, address: str | None = None, progress: bool = False, pool: ScorerPool | None = None) -> dict[str, dict[int, float]]:
    """``{layer: {bits: Δloss}}`` for every bit-width of the menu (16: the fp16 rounding alone).

    ``pool``: score on these (the search's) actors instead of starting new ones. The FP loss each
    Δ is taken from is scored by the same pool (an empty partial plan), so both sides of every
    difference ran on the same device.
    """
    table = workload.layer_table()
    jobs = [(name, bits) for name in table.names for bits in table.levels(name)]  # a width a layer cannot take is scored once, as the one it takes
    own = pool is None
    if own:  # in this process it scores on the workload itself (one copy of the model), which it gets back after
        workload.candidate_bank(progress=progress)  # fills the disk cache the actors read
        pool = ScorerPool(
            workload.spec, workers=workers, address=address, device=str(workload.device) if not workers else "cpu",
            snapshot=workload.snapshot() if workers else None, workload=workload if not workers else None,
        )
    try:
        plans = [Plan(layers={})] + [Plan.of_bits({name: bits}) for name, bits in jobs]
        base, *losses = pool.map(plans, split="calibration", partial=True, progress=progress, desc="perturbation scan")
    finally:
        if own:
            pool.close()
    scores: dict[str, dict[int, float]] = {name: {} for name in table.names}
    for (name, bits), loss in zip(jobs, losses):
        scores[name][bits] = loss - base
    for name in table.names:
        scores[name] = {bits: scores[name][table.layer_level(name, bits)] for bits in table.menu}
    return scores


def _rows(workload, params: dict, options: Options, pool, progress: bool) -> list[dict]:
    scores = perturbation_scores(workload, workers=options.workers, address=options.address, progress=progress, pool=pool)
    return [{"name": layer.name, "n": layer.n, "score": {str(b): v for b, v in scores[layer.name].items()}} for layer in workload.layer_table().layers]


SENSITIVITY.register("perturbation")(Method(label="Δloss", params=lambda workload, options: {}, compute=_rows, on_scorer=False))
