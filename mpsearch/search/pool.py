"""Scoring plans in parallel: Ray actors that each hold the workload and the candidate bank.

A :class:`Scorer` loads the workload once (model, data, FP reference outputs) and the
bank (from its disk cache, which the driver fills first), then scores plans: swap the
candidates in, compute the loss, restore. Scorers never touch the database.

:class:`ScorerPool` runs ``workers`` scorers as Ray actors behind ``ray.util.ActorPool``,
on a local Ray started in-process or on the cluster at ``address``; ``workers=0`` scores
in this process instead (the baseline the parallel scan is measured against).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Literal, Mapping

import torch

from mpsearch.errors import MPSearchError

Split = Literal["calibration", "evaluation"]


class Scorer:
    """One workload, one bank, one model copy: ``plan -> loss``."""

    def __init__(self, spec, device: str = "cpu", threads: int | None = None, cache_dir: str | None = None, snapshot: dict | None = None):
        if threads:
            torch.set_num_threads(threads)
        if cache_dir is not None:
            os.environ["MPSEARCH_CACHE_DIR"] = cache_dir  # the driver's cache, also in a Ray worker
        from mpsearch.workload import Workload

        self.workload = Workload(spec, device=device)
        if snapshot is not None:
            self.workload.adopt(snapshot)
        self.bank = self.workload.candidate_bank()
        self.model = self.workload.build_model()

    def score(self, plan: Mapping[str, int], split: Split = "evaluation", partial: bool = False) -> float:
        with self.bank.applied(self.model, plan, partial):
            return self.workload.loss(self.model, split)

    def score_batch(self, jobs: list[tuple[int, dict]], split: Split, partial: bool) -> list[tuple[int, float]]:
        return [(i, self.score(plan, split, partial)) for i, plan in jobs]


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one (once per process)."""
    if address:
        os.environ.update(ray_client_env())
        _check_reachable(address)
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=num_cpus, **kwargs)  # a new local Ray, whatever else runs here
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray"
        raise MPSearchError(f"cannot start or reach Ray at {where} ({str(e).splitlines()[0]}); check --address or `ray status`") from None


def ray_client_env() -> dict[str, str]:
    """Environment for a client of an existing cluster.

    A Ray 2.60 head runs with token auth when it finds a token (``~/.ray/auth_token``, which
    a local ``ray.init`` creates, or ``$RAY_AUTH_TOKEN``), but a client only sends its token
    in ``RAY_AUTH_MODE=token``, read when Ray is first imported. Sending one to a head
    without auth does no harm, so: token mode whenever a token exists and the user chose no
    mode.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return {}
    if os.environ.get("RAY_AUTH_TOKEN") or Path("~/.ray/auth_token").expanduser().exists():
        return {"RAY_AUTH_MODE": "token"}
    return {}


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nothing listens on (Ray itself retries for minutes)."""
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        if address == "auto":
            return
        raise MPSearchError(f"--address {address!r} is not HOST:PORT (the head's GCS port, 6379 unless changed)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise MPSearchError(f"cannot start or reach Ray at {address} ({e.strerror or e}); check --address or `ray status`") from None


class ScorerPool:
    """``workers`` scorers; ``map`` scores plans and returns losses in order."""

    def __init__(self, spec, workers: int, address: str | None = None, device: str = "cpu", snapshot: dict | None = None):
        from mpsearch.quant.bank import default_cache_dir

        self.workers = workers
        cache = default_cache_dir()
        if workers <= 0:
            self._local = Scorer(spec, device=device, snapshot=snapshot)
            self._pool = None
            return
        start_ray(address, num_cpus=None if address else max(workers, os.cpu_count() or 1))  # before importing ray
        import ray
        from ray.util import ActorPool

        # Each actor reserves one CPU; locally the cores are shared out, on a cluster one each.
        threads = max(1, (os.cpu_count() or 1) // workers) if not address else 1
        actor = ray.remote(num_cpus=1)(Scorer)
        shared = ray.put(snapshot) if snapshot is not None else None  # one copy in the object store
        self._actors = [actor.remote(spec, device, threads, str(cache) if cache else None, shared) for _ in range(workers)]
        self._pool = ActorPool(self._actors)
        self._local = None

    def map(self, plans: Iterable[Mapping[str, int]], split: Split = "evaluation", partial: bool = False, progress: bool = False, desc: str = "scoring", chunk: int = 1) -> list[float]:
        from tqdm.auto import tqdm

        plans = [dict(p) for p in plans]
        losses: list[float | None] = [None] * len(plans)
        bar = tqdm(total=len(plans), desc=desc, unit="plan", disable=not progress, leave=False)
        if self._pool is None:
            for i, plan in enumerate(plans):
                losses[i] = self._local.score(plan, split, partial)
                bar.update()
        else:
            jobs = [list(enumerate(plans))[k : k + chunk] for k in range(0, len(plans), chunk)]
            for results in self._pool.map_unordered(lambda a, batch: a.score_batch.remote(batch, split, partial), jobs):
                for i, loss in results:
                    losses[i] = loss
                bar.update(len(results))
        bar.close()
        return losses  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            import ray

            for a in self._actors:
                ray.kill(a)
            self._pool = None
