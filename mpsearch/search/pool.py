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
import socket
import time
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

    def evaluate(self, plan: Mapping[str, int], split: Split = "evaluation") -> dict:
        """One trial: ``{loss, seconds, worker, error}``. An exception in the evaluation is
        returned, not raised, so the driver can tell it from a worker that died."""
        start = time.perf_counter()
        worker = f"{socket.gethostname()}:{os.getpid()}"
        try:
            loss = self.score(plan, split)
        except Exception as e:  # noqa: BLE001 - reported as the trial's failure reason
            return {"loss": None, "seconds": time.perf_counter() - start, "worker": worker, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        return {"loss": loss, "seconds": time.perf_counter() - start, "worker": worker, "error": None}

    def pid(self) -> int:
        return os.getpid()


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
    """``workers`` scorers, as Ray actors (or one in this process for ``workers=0``).

    The driver uses the slots directly (:meth:`submit`, :meth:`replace`); :meth:`map`
    scores a list of plans and returns the losses in order.
    """

    def __init__(self, spec, workers: int, address: str | None = None, device: str = "cpu", snapshot: dict | None = None):
        from mpsearch.quant.bank import default_cache_dir

        self.workers = workers
        self.spec, self.device, self.address = spec, device, address
        cache = default_cache_dir()
        self._cache = str(cache) if cache else None
        self.actors: list = []
        if workers <= 0:
            self._local = Scorer(spec, device=device, snapshot=snapshot)
            return
        self._local = None
        start_ray(address, num_cpus=None if address else max(workers, os.cpu_count() or 1))  # before importing ray
        import ray

        # Each actor reserves one CPU; locally the cores are shared out, on a cluster one each.
        self._threads = max(1, (os.cpu_count() or 1) // workers) if not address else 1
        self._actor_class = ray.remote(num_cpus=1, max_restarts=0)(Scorer)
        self._snapshot = ray.put(snapshot) if snapshot is not None else None  # one copy in the object store
        self.actors = [self._spawn() for _ in range(workers)]

    def _spawn(self):
        return self._actor_class.remote(self.spec, self.device, self._threads, self._cache, self._snapshot)

    @property
    def local(self) -> bool:
        return self._local is not None

    @property
    def slots(self) -> int:
        return max(1, len(self.actors))

    def submit(self, slot: int, plan: Mapping[str, int], split: Split = "evaluation"):
        """A Ray reference to the slot's evaluation of ``plan`` (locally: the result itself)."""
        if self._local is not None:
            return self._local.evaluate(plan, split)
        return self.actors[slot].evaluate.remote(dict(plan), split)

    def replace(self, slot: int) -> None:
        """Kill the slot's actor (if it still lives) and start a fresh one in its place."""
        import ray

        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[slot] = self._spawn()

    def map(self, plans: Iterable[Mapping[str, int]], split: Split = "evaluation", partial: bool = False, progress: bool = False, desc: str = "scoring", chunk: int = 1, timeout_s: float = 3600.0) -> list[float]:
        from tqdm.auto import tqdm

        plans = [dict(p) for p in plans]
        losses: list[float | None] = [None] * len(plans)
        bar = tqdm(total=len(plans), desc=desc, unit="plan", disable=not progress, leave=False)
        if self._local is not None:
            for i, plan in enumerate(plans):
                losses[i] = self._local.score(plan, split, partial)
                bar.update()
        else:
            import ray

            jobs = [list(enumerate(plans))[k : k + chunk] for k in range(0, len(plans), chunk)]
            jobs.reverse()
            running = {}
            for slot in range(len(self.actors)):
                if jobs:
                    running[self.actors[slot].score_batch.remote(jobs.pop(), split, partial)] = slot
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout_s)
                if not ready:
                    raise MPSearchError(f"{desc}: no worker answered in {timeout_s:.0f} s; check the Ray cluster (`ray status`)")
                for ref in ready:
                    slot = running.pop(ref)
                    for i, loss in ray.get(ref, timeout=timeout_s):
                        losses[i] = loss
                        bar.update()
                    if jobs:
                        running[self.actors[slot].score_batch.remote(jobs.pop(), split, partial)] = slot
        bar.close()
        return losses  # type: ignore[return-value]

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.actors = []
