"""Reading studies and trials back out of Optuna's tables, as `mpsearch studies` and `trials` show them.

A trial's value is its loss; the search stores the plan's exact ``bytes``, its ``bpw``,
the ``plan`` and, for a failed trial, the ``error`` as user attributes.
"""

from __future__ import annotations

import math
from collections import Counter

from mpsearch.errors import MPSearchError, NotFoundError
from mpsearch.storage.database import shown
from mpsearch.storage.store import ATTR_BPW, ATTR_BYTES, ATTR_ERROR, Storage

STATES = ("COMPLETE", "RUNNING", "WAITING", "PRUNED", "FAIL")


def study_names(storage: Storage) -> list[str]:
    import optuna

    return sorted(optuna.get_all_study_names(storage.optuna()))


def load_study(storage: Storage, name: str):
    """The Optuna study ``name``; an unknown name lists the known ones."""
    import optuna

    names = study_names(storage)
    if name not in names:
        known = ", ".join(names[:20]) + (" …" if len(names) > 20 else "") if names else "none yet"
        raise NotFoundError(f"no study named {name!r} in {shown(storage.url)}; known studies: {known}")
    return optuna.load_study(study_name=name, storage=storage.optuna())


def trial_row(trial) -> dict:
    loss = trial.values[0] if trial.values else None
    duration = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete and trial.datetime_start else None
    return {
        "number": trial.number,
        "state": trial.state.name,
        "loss": loss,
        "bytes": trial.user_attrs.get(ATTR_BYTES),
        "bpw": trial.user_attrs.get(ATTR_BPW),
        "duration_s": duration,
        "source": trial.user_attrs.get("source"),
        "worker": trial.user_attrs.get("worker"),
        "error": trial.user_attrs.get(ATTR_ERROR),
    }


def trial_rows(storage: Storage, name: str) -> list[dict]:
    return [trial_row(t) for t in load_study(storage, name).get_trials(deepcopy=False)]


def pareto_rows(storage: Storage, name: str) -> list[dict]:
    """The Pareto-optimal complete trials of a two-objective (loss, bytes) study, smallest first."""
    study = load_study(storage, name)
    if len(study.directions) < 2:
        raise MPSearchError(f"study {name!r} has one objective, so no Pareto front; run `mpsearch search SPEC --pareto` for one")
    return sorted((trial_row(t) for t in study.best_trials), key=lambda r: (r["bytes"], r["loss"]))


def study_rows(storage: Storage) -> list[dict]:
    """One row per study: trial counts by state and the best (lowest-loss) complete trial."""
    import optuna

    rows = []
    for name in study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage.optuna())
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name for t in trials)
        complete = [t for t in trials if t.state.name == "COMPLETE" and t.values and math.isfinite(t.values[0])]
        best = min(complete, key=lambda t: (t.values[0], t.number), default=None)
        rows.append(
            {
                "name": name,
                "n_trials": len(trials),
                "states": {state.lower(): counts.get(state, 0) for state in STATES},
                "best": None if best is None else {k: v for k, v in trial_row(best).items() if k in ("number", "loss", "bytes", "bpw")},
            }
        )
    return rows
