"""Scoring plans in parallel: a pool of :class:`~mpsearch.runtime.scorer.Scorer` Ray actors.

:class:`ScorerPool` runs ``workers`` scorers as Ray actors, on a local Ray started in-process
or on the cluster at ``address``; ``workers=0`` scores in this process instead. Each actor
reserves one CPU and ``gpus_per_worker`` GPUs (fractions share a GPU); Ray then shows the
actor only its own GPUs, and the actor runs on ``cuda``. The driver uses the slots directly
(:meth:`ScorerPool.submit`, :meth:`ScorerPool.replace`); :meth:`ScorerPool.map` scores a list
of plans and returns the losses in order. Every wait on an actor has a timeout, and an actor
that dies is replaced.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from mpsearch.errors import MPSearchError, death_cause
from mpsearch.plan import Plan
from mpsearch.runtime.cluster import start_ray
from mpsearch.runtime.scorer import Scorer, Split


class ScorerPool:
    """``workers`` scorers, as Ray actors (or one in this process for ``workers=0``).

    Starting it starts (or joins) Ray and the actors; use it as a context manager, or
    :meth:`close` it.
    """

    def __init__(
        self,
        spec,
        workers: int,
        address: str | None = None,
        device: str = "cpu",
        snapshot: dict | None = None,
        gpus_per_worker: float = 0.0,
        workload=None,
    ):
        from mpsearch.quant.bank import default_cache_dir

        self.workers = workers
        self.spec, self.address = spec, address
        self.gpus_per_worker = gpus_per_worker
        cache = default_cache_dir()
        self._cache = str(cache) if cache else None
        self.actors: list = []
        self.device = device
        if workers <= 0:  # in this process: on the caller's workload when it gives one (one copy of the model)
            self._local = Scorer(spec, device=device, snapshot=None if workload is not None else snapshot, workload=workload)
            return
        self._local = None
        if gpus_per_worker < 0:
            raise MPSearchError(f"search.gpus_per_worker must be ≥ 0, got {gpus_per_worker}")
        if gpus_per_worker == 0 and str(device).startswith("cuda"):
            raise MPSearchError(
                f"device {device!r} with {workers} Ray workers needs search.gpus_per_worker > 0: Ray hides the GPUs "
                "from an actor that reserves none; set it (e.g. 1, or 0.5 to share a GPU) or use --workers 0"
            )
        # An actor with GPUs sees only its own (CUDA_VISIBLE_DEVICES): its device is plain "cuda".
        self.device = "cuda" if gpus_per_worker > 0 else device
        start_ray(address, num_cpus=None if address else max(workers, os.cpu_count() or 1))  # before importing ray
        import ray

        # Each actor reserves one CPU; locally the cores are shared out, on a cluster one each.
        self._threads = max(1, (os.cpu_count() or 1) // workers) if not address else 1
        self._actor_class = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=0)(Scorer)
        self._snapshot = ray.put(snapshot) if snapshot is not None else None  # one copy in the object store
        self.actors = [self._spawn() for _ in range(workers)]

    def _spawn(self):
        return self._actor_class.remote(self.spec, self.device, self._threads, self._cache, self._snapshot)

    def __enter__(self) -> "ScorerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def local(self) -> bool:
        return self._local is not None

    @property
    def slots(self) -> int:
        return max(1, len(self.actors))

    def submit(self, slot: int, plan: Plan, split: Split = "evaluation", batches: tuple[int, int] | None = None):
        """A Ray reference to the slot's evaluation of ``plan`` (locally: the result itself), on
        the split's batches ``start:stop`` when ``batches`` is given (one stage of a trial)."""
        if self._local is not None:
            return self._local.evaluate(plan, split, batches)
        return self.actors[slot].evaluate.remote(plan, split, batches)

    def replace(self, slot: int) -> None:
        """Kill the slot's actor (if it still lives) and start a fresh one in its place."""
        import ray

        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[slot] = self._spawn()

    def call(self, fn, *args, timeout_s: float = 24 * 3600.0, **kwargs):
        """``fn(workload, *args, **kwargs)`` on the first scorer's workload (see :meth:`Scorer.call`):
        on its device, in its process; ``fn`` must be importable there (a module-level function)."""
        if self._local is not None:
            return self._local.call(fn, *args, **kwargs)
        import ray

        try:
            return ray.get(self.actors[0].call.remote(fn, *args, **kwargs), timeout=timeout_s)
        except ray.exceptions.RayActorError as e:
            self.replace(0)
            raise MPSearchError(f"the worker died while running {getattr(fn, '__name__', fn)} ({death_cause(e)}); check its memory and logs") from None

    def prepare(self, progress: bool = False, timeout_s: float = 24 * 3600.0) -> None:
        """Build the candidate bank (into the disk cache the others read) and the reference
        outputs on the first scorer, on its device, and hand the reference to the others: the
        driver needs no GPU when the scorers have them."""
        snapshot = self.call(_prepare, progress, timeout_s=timeout_s)
        if self._local is None and len(self.actors) > 1:
            import ray

            shared = ray.put(snapshot)
            ray.get([a.adopt.remote(shared) for a in self.actors[1:]], timeout=timeout_s)

    def placements(self, timeout_s: float = 60.0) -> list[dict]:
        """Where each actor runs and which GPUs Ray gave it (nothing is loaded on the way)."""
        if self._local is not None:
            return [self._local.placement()]
        import ray

        return ray.get([a.placement.remote() for a in self.actors], timeout=timeout_s)

    def map(
        self,
        plans: Iterable[Plan | Mapping[str, int]],
        split: Split = "evaluation",
        partial: bool = False,
        progress: bool = False,
        desc: str = "scoring",
        chunk: int = 1,
        timeout_s: float = 3600.0,
        batches: tuple[int, int] | None = None,
    ) -> list[float]:
        """The loss of each plan, in order (on the split's batches ``start:stop`` when ``batches``
        is given). An actor that dies is replaced and its chunk scored again, once; a second
        death of the same chunk, or no answer within ``timeout_s``, ends it."""
        from tqdm.auto import tqdm

        plans = [Plan.coerce(p) for p in plans]
        losses: list[float | None] = [None] * len(plans)
        bar = tqdm(total=len(plans), desc=desc, unit="plan", disable=not progress, leave=False)
        try:
            if self._local is not None:
                for i, plan in enumerate(plans):
                    losses[i] = self._local.score(plan, split, partial, batches=batches)
                    bar.update()
            else:
                self._map_on_actors(plans, losses, split, partial, chunk, timeout_s, desc, bar, batches)
        finally:
            bar.close()
        return losses  # type: ignore[return-value]

    def _map_on_actors(self, plans, losses, split, partial, chunk, timeout_s, desc, bar, batches=None) -> None:
        import ray

        jobs = [list(enumerate(plans))[k : k + chunk] for k in range(0, len(plans), chunk)]
        jobs.reverse()
        retried: set[int] = set()
        running: dict = {}  # ref -> (slot, job)

        def send(slot: int) -> None:
            if jobs:
                job = jobs.pop()
                running[self.actors[slot].score_batch.remote(job, split, partial, batches)] = (slot, job)

        for slot in range(len(self.actors)):
            send(slot)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=timeout_s)
            if not ready:
                raise MPSearchError(f"{desc}: no worker answered in {timeout_s:.0f} s; check the Ray cluster (`ray status`)")
            for ref in ready:
                slot, job = running.pop(ref)
                try:
                    results = ray.get(ref, timeout=timeout_s)
                except ray.exceptions.RayActorError as e:
                    key = job[0][0]
                    if key in retried:
                        raise MPSearchError(f"{desc}: a worker died twice on the same plans ({death_cause(e)}); check the workers' memory and logs") from None
                    retried.add(key)
                    self.replace(slot)
                    jobs.append(job)
                    send(slot)
                    continue
                for i, loss in results:
                    losses[i] = loss
                    bar.update()
                send(slot)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        if self.actors:
            import ray

            for a in self.actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.actors = []


def _prepare(workload, progress: bool = False) -> dict | None:
    """The bank and every split's reference outputs of ``workload``; the snapshot other scorers take."""
    workload.candidate_bank(progress=progress)
    return workload.snapshot()
