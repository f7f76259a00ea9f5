"""What a report shows, read from a study: its trials, baselines, best plans and sensitivities."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mpsearch.plan import bits_of
from mpsearch.storage.trials import BPW, RELINEARISED, SAMPLED, Outcome, TrialLog, TrialRecord, pareto_front

# The profile a report shows beside the plan: Δloss with the layer alone quantized, else Hessian.
SENSITIVITY_ORDER = ("perturbation", "hessian")
SENSITIVITY_LABELS = {"perturbation": "Δloss, layer alone quantized", "hessian": "Tr(H)/n · ‖Q(W) − W‖²"}


@dataclass
class StudyData:
    """One study, as the figures read it."""

    name: str
    meta: dict[str, Any]
    records: list[TrialRecord]
    outcome: Outcome
    top: list[TrialRecord]  # the best complete plans within the budget, best first
    sensitivity: dict[str, float | None] = field(default_factory=dict)  # {layer: score at the lowest bits}
    sensitivity_method: str | None = None
    sensitivity_bits: int | None = None

    @property
    def layers(self) -> list[str]:
        if self.meta.get("layers"):
            return list(self.meta["layers"])
        best = self.best
        return best.plan.names() if best is not None and best.plan is not None else []

    @property
    def menu(self) -> list[int]:
        """The bit-widths plans may hold (a scheme option, ``"2g32"``, counts as its bits)."""
        return sorted({bits_of(w) for w in self.meta.get("menu") or ()} or {b for r in self.top if r.plan for b in r.plan.bits().values()})

    @property
    def budget_bytes(self) -> int | None:
        return self.outcome.budget_bytes

    @property
    def best(self) -> TrialRecord | None:
        return self.top[0] if self.top else None

    @property
    def complete(self) -> list[TrialRecord]:
        """Complete, finite, each plan once (a repeat told its value again is not a trial)."""
        return [r for r in self.records if r.finite and not r.repeat]

    def ledger(self) -> tuple[float, float] | None:
        """``(other bytes, quantizable weights)`` from the trials: a plan's bytes are the model's
        (every other tensor included) and its bpw counts the quantized layers only, so
        ``bytes = other + bpw × weights / 8``; two trials of different sizes fix both."""
        sized = {}
        for r in self.complete:
            if r.bytes is not None and r.attrs.get(BPW):
                sized.setdefault(r.bytes, float(r.attrs[BPW]))
        if len(sized) < 2:
            return None
        (b1, p1), (b2, p2) = min(sized.items()), max(sized.items())
        if p2 == p1:
            return None
        weights = (b2 - b1) * 8 / (p2 - p1)
        return b1 - p1 * weights / 8, weights

    def bpw(self, nbytes: int | None) -> float | None:
        ledger = self.ledger()
        if nbytes is None or ledger is None:
            return None
        other, weights = ledger
        return (nbytes - other) * 8 / weights

    def front(self) -> list[TrialRecord]:
        return pareto_front(r for r in self.complete if r.bytes is not None)

    def top_k_shares(self) -> dict[str, Counter]:
        """``{layer: Counter(bits)}`` over the top plans: how sure the search is of each layer."""
        shares = {name: Counter() for name in self.layers}
        for r in self.top:
            for name, bits in (r.plan.bits() if r.plan else {}).items():
                shares.setdefault(name, Counter())[bits] += 1
        return shares


def kind(record: TrialRecord) -> str:
    """``sampled``, ``relinearised`` or ``baseline`` (a warm start)."""
    if record.source == RELINEARISED:
        return "relinearised"
    return "sampled" if record.source in (SAMPLED, None) else "baseline"


def gather(storage, name: str, top_k: int = 10) -> StudyData:
    """Study ``name`` read from ``storage`` (a :class:`~mpsearch.errors.NotFoundError` names the
    known studies when there is none)."""
    log = TrialLog.open(storage, name)
    records = log.records()
    outcome = log.outcome()
    ranked = sorted((r for r in records if r.finite and not r.repeat and r.plan is not None), key=lambda r: (r.loss, r.number))
    budget = outcome.budget_bytes
    within = [r for r in ranked if budget is None or (r.bytes is not None and r.bytes <= budget)]
    data = StudyData(name=name, meta=log.meta, records=records, outcome=outcome, top=within[: max(top_k, 1)])
    _add_sensitivity(data, log.sensitivity())
    return data


def _add_sensitivity(data: StudyData, profiles: dict[str, dict[str, dict[str, float]]]) -> None:
    method = next((m for m in SENSITIVITY_ORDER if profiles.get(m)), next(iter(profiles), None))
    if method is None:
        return
    ints = [b for b in data.menu if b != 16] or data.menu
    low = str(min(ints)) if ints else None
    data.sensitivity_method, data.sensitivity_bits = method, int(low) if low else None
    data.sensitivity = {layer: scores.get(low) for layer, scores in profiles[method].items()}


# -- layer names ----------------------------------------------------------------------------

_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def block_of(name: str) -> str:
    """The repeated block a layer sits in (``encoder.layer.3.attention.self.query`` → ``3``), or
    the layer's own first name part for one outside any (``pooler``, ``lm_head``)."""
    m = _BLOCK.search(name)
    return m.group(1) if m else name.split(".")[0]


def short_name(name: str) -> str:
    """The part after the block number: what tells layers of one block apart."""
    m = _BLOCK.search(name)
    return name[m.end():] or name if m else name
