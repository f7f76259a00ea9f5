"""`mpsearch analyze`: one sensitivity profile per (method, model, data, scheme, settings),
computed once, kept in the database (and in the disk cache beside the banks, for the next
database on this machine), ranked and plotted.

The methods are the entries of :data:`~mpsearch.sensitivity.profile.SENSITIVITY`:

* ``hessian``: HAWQ's ``Ω(l, b) = Tr(H_l)/n_l · ‖Q_b(W_l) − W_l‖²`` (traces by Hutchinson);
* ``perturbation``: ``Δloss(l, b)`` with layer ``l`` alone quantized, on the calibration set;
* ``fisher``: ``Σ F ⊙ (Q_b(W) − W)²`` with the Gauss–Newton diagonal ``F``.

Layers are ranked by their score at the menu's lowest integer bit-width, most sensitive first.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from mpsearch.errors import MPSearchError
from mpsearch.hashing import batches_digest, json_digest
from mpsearch.memory import trim
from mpsearch.sensitivity.profile import SENSITIVITY, Options, Profile, lowest_bits, rank


def profile_key(workload, method: str, params: dict):
    """What a stored profile of ``method`` must match to be reused."""
    from mpsearch.storage import ProfileKey

    table = workload.layer_table()
    scheme = {"scheme": table.scheme.to_dict(), "menu": list(table.menu), "layers": table.names}
    full = {**params, "loss": workload.spec.keyed()["loss"]}
    return ProfileKey(
        method=method,
        model_key=workload.model_key(),
        data_key=batches_digest(workload.calibration_batches()),
        scheme_key=json_digest(scheme),
        params=full,
    )


def stored_profile(storage, key, method: str, params: dict) -> Profile | None:
    """The profile ``storage`` holds for exactly ``key``, if any."""
    found = storage.find_profile(key)
    if found is None:
        return None
    return Profile.from_values(method, found.values, params, found.seconds or 0.0, reused=True)


def analyze(
    workload,
    method: str = "hessian",
    storage=None,
    *,
    progress: bool = False,
    recompute: bool = False,
    pool=None,
    **options,
) -> Profile:
    """The ``method`` profile of the workload, from ``storage`` when it holds one for these keys.

    ``options`` are :class:`~mpsearch.sensitivity.profile.Options` fields (``mode``, ``tol``,
    ``fisher_samples``, ...); ``pool``: score on these actors instead of starting new ones.
    """
    if method not in SENSITIVITY:
        raise MPSearchError(f"--method must be one of {', '.join(SENSITIVITY.names())}, got {method!r}")
    entry = SENSITIVITY.get(method)
    opts = Options(**options)
    params = entry.params(workload, opts)
    key = profile_key(workload, method, params) if storage is not None else None
    if key is not None and not recompute:
        found = stored_profile(storage, key, method, params)
        if found is None and (found := cached_profile(key, params)) is not None:  # computed for another database
            storage.save_profile(key, {"layers": found.layers, "ranking": found.ranking}, study=workload.spec.name, seconds=found.seconds)
        if found is not None:
            return found
    start = time.perf_counter()
    if pool is not None and entry.on_scorer:
        layers = pool.call(entry.compute, params, opts, None, progress)
    else:
        layers = entry.compute(workload, params, opts, pool, progress)
    seconds = time.perf_counter() - start
    trim()
    profile = Profile(method=method, layers=layers, ranking=rank(layers, workload.layer_table().menu), seconds=seconds, params=params)
    if storage is not None:
        storage.save_profile(key, {"layers": profile.layers, "ranking": profile.ranking}, study=workload.spec.name, seconds=seconds)
        keep_profile(key, profile)
    return profile


def _cache_file(key) -> Path | None:
    """Where the disk cache keeps the profile for ``key``: beside the banks, one JSON file per key."""
    from mpsearch.quant.bank import default_cache_dir

    folder = default_cache_dir()
    if folder is None:
        return None
    name = json_digest({"model": key.model_key, "data": key.data_key, "scheme": key.scheme_key, "params": key.params_key})
    return folder / "profiles" / f"{key.method}-{name}.json"


def cached_profile(key, params: dict) -> Profile | None:
    """The profile for exactly ``key`` that a run against another database kept on disk, if any.

    A profile depends on the model, the calibration data, the scheme and the settings, all in the
    key, and not on the database: a new SQLite file or a cluster's PostgreSQL reuses what this
    machine measured. A file that cannot be read is ignored (the profile is computed again)."""
    import json

    path = _cache_file(key)
    if path is None or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return Profile(method=key.method, layers=doc["layers"], ranking=doc["ranking"], seconds=float(doc["seconds"]), params=params, reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_profile(key, profile: Profile) -> None:
    """Write ``profile`` to the disk cache (whole or not at all); a cache that cannot be written is skipped."""
    import json
    import os
    import tempfile

    path = _cache_file(key)
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
            tmp = f.name
            json.dump({"layers": profile.layers, "ranking": profile.ranking, "seconds": profile.seconds}, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def plot(profile: Profile, path: str | Path, menu: tuple[int, ...]) -> None:
    """A bar chart of each layer's sensitivity (its score at the lowest integer bit-width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = lowest_bits(menu)
    names = [row["name"] for row in profile.layers]
    values = [max(row["score"][low], 0.0) for row in profile.layers]
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(names)), 5))
    ax.bar(range(len(names)), values, color="#4C72B0")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_ylabel(f"{SENSITIVITY.get(profile.method).label} at {low} bits")
    ax.set_title(f"per-layer sensitivity ({profile.method})")
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(name: str) -> str:
    return name.replace("encoder.layer.", "L").replace("attention.self.", "attn.").replace("attention.output.", "attn.out.")
