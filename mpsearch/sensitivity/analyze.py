"""`mpsearch analyze`: one sensitivity profile per (method, model, data, scheme, settings),
computed once, kept in the database, ranked and plotted.

Every method gives a score per (layer, bits), larger meaning quantizing hurts more:

* ``hessian``: HAWQ's ``Ω(l, b) = Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖²`` (traces by Hutchinson);
* ``perturbation``: ``Δloss(l, b)`` with layer ``l`` alone quantized, on the calibration set;
* ``fisher``: ``Σ F ⊙ (Q_b(W) − W)²`` with the Gauss–Newton diagonal ``F``.

Layers are ranked by their score at the menu's lowest integer bit-width, most sensitive first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from mpsearch.errors import MPSearchError
from mpsearch.hashing import batches_digest, json_digest, model_digest
from mpsearch.quant.scheme import FLOAT_BITS

METHODS = ("hessian", "perturbation", "fisher")


@dataclass
class Profile:
    method: str
    layers: list[dict]
    ranking: list[str]
    seconds: float
    params: dict = field(default_factory=dict)
    reused: bool = False

    def to_json(self) -> dict:
        """DESIGN.md's `analyze --json` document (keys only ever added)."""
        return {
            "method": self.method,
            "layers": self.layers,
            "ranking": self.ranking,
            "params": self.params,
            "seconds": self.seconds,
            "reused": self.reused,
        }

    @classmethod
    def from_values(cls, method: str, values: dict, params: dict, seconds: float, reused: bool) -> "Profile":
        return cls(method=method, layers=values["layers"], ranking=values["ranking"], seconds=seconds, params=params, reused=reused)


def rank(layers: list[dict], menu: tuple[int, ...]) -> list[str]:
    """Most sensitive first, by the score at the lowest integer bit-width of the menu."""
    low = str(min((b for b in menu if b != FLOAT_BITS), default=menu[0]))
    return [row["name"] for row in sorted(layers, key=lambda r: (-_finite(r["score"][low]), r["name"]))]


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else -math.inf


def profile_key(workload, method: str, params: dict):
    from mpsearch.storage import ProfileKey

    table = workload.layer_table()
    scheme = {"scheme": table.scheme.to_dict(), "menu": list(table.menu), "layers": table.names}
    full = {**params, "loss": workload.spec.loss.model_dump()}
    return ProfileKey(
        method=method,
        model_key=model_digest(workload.fp_model()),
        data_key=batches_digest(workload.calibration_batches()),
        scheme_key=json_digest(scheme),
        params=full,
    )


def analyze(
    workload,
    method: str = "hessian",
    storage=None,
    *,
    mode: str = "all",
    estimator: str = "auto",
    tol: float | None = None,
    max_probes: int | None = None,
    seed: int = 0,
    workers: int = 2,
    address: str | None = None,
    fisher_samples: int = 4,
    progress: bool = False,
    recompute: bool = False,
    pool=None,
) -> Profile:
    """The ``method`` profile of the workload, from ``storage`` when it holds one for these keys."""
    from mpsearch.sensitivity import hessian

    if method not in METHODS:
        raise MPSearchError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "hessian":
        params = {
            "mode": mode,
            "estimator": hessian.resolve_estimator(workload, estimator) if mode == "all" else "hvp",
            "tol": tol if tol is not None else hessian.DEFAULT_TOL,
            "min_probes": hessian.DEFAULT_MIN_PROBES,
            "max_probes": max_probes if max_probes is not None else hessian.DEFAULT_MAX_PROBES,
            "seed": seed,
        }
    elif method == "fisher":
        params = {"samples": fisher_samples, "seed": seed}
    else:
        params = {}
    key = profile_key(workload, method, params) if storage is not None else None
    if key is not None and not recompute:
        found = storage.find_profile(key)
        if found is not None:
            return Profile.from_values(method, found.values, params, found.seconds or 0.0, reused=True)

    start = time.perf_counter()
    table = workload.layer_table()
    layers = []
    if method == "hessian":
        traces = hessian.hessian_traces(workload, mode=mode, estimator=params["estimator"], tol=params["tol"], max_probes=params["max_probes"], seed=seed, progress=progress)
        scores = hessian.hawq_scores(traces, workload.candidate_bank(progress=progress))
        for layer in table.layers:
            layers.append(
                {
                    "name": layer.name,
                    "n": layer.n,
                    "trace": traces.trace[layer.name],
                    "trace_stderr": _json_float(traces.stderr[layer.name]),
                    "probes": traces.probes[layer.name],
                    "score": {str(b): v for b, v in scores[layer.name].items()},
                }
            )
    elif method == "perturbation":
        from mpsearch.sensitivity.perturbation import perturbation_scores

        scores = perturbation_scores(workload, workers=workers, address=address, progress=progress, pool=pool)
        layers = [{"name": layer.name, "n": layer.n, "score": {str(b): v for b, v in scores[layer.name].items()}} for layer in table.layers]
    else:
        from mpsearch.sensitivity.fisher import fisher_diagonal, fisher_scores

        fisher = fisher_diagonal(workload, samples=fisher_samples, seed=seed, progress=progress)
        scores = fisher_scores(fisher, workload.candidate_bank(progress=progress), workload.fp_model())
        layers = [
            {"name": layer.name, "n": layer.n, "trace": float(fisher[layer.name].sum()), "score": {str(b): v for b, v in scores[layer.name].items()}}
            for layer in table.layers
        ]
    seconds = time.perf_counter() - start
    profile = Profile(method=method, layers=layers, ranking=rank(layers, table.menu), seconds=seconds, params=params)
    if storage is not None:
        storage.save_profile(key, {"layers": profile.layers, "ranking": profile.ranking}, study=workload.spec.name, seconds=seconds)
    return profile


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def plot(profile: Profile, path: str, menu: tuple[int, ...]) -> None:
    """A bar chart of each layer's sensitivity (its score at the lowest integer bit-width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = str(min((b for b in menu if b != FLOAT_BITS), default=menu[0]))
    names = [row["name"] for row in profile.layers]
    values = [max(row["score"][low], 0.0) for row in profile.layers]
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(names)), 5))
    ax.bar(range(len(names)), values, color="#4C72B0")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    label = {"hessian": "Ω = Tr(H)/n · ‖Q(W) − W‖²", "perturbation": "Δloss", "fisher": "Σ F (Q(W) − W)²"}[profile.method]
    ax.set_ylabel(f"{label} at {low} bits")
    ax.set_title(f"per-layer sensitivity ({profile.method})")
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(name: str) -> str:
    return name.replace("encoder.layer.", "L").replace("attention.self.", "attn.").replace("attention.output.", "attn.out.")
