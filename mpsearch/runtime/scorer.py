"""A scorer: one workload, one candidate bank and one model copy, turning plans into losses.

It runs in a Ray actor (see :mod:`mpsearch.runtime.pool`) or in the driver's own process. It
never touches the database.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Literal, Mapping

import torch

from mpsearch.plan import Plan

Split = Literal["calibration", "evaluation", "test"]


class Scorer:
    """``plan -> loss`` on the workload of ``spec``, on ``device``.

    Nothing is loaded until the first plan: the workload (model, data, FP reference outputs,
    unless a ``snapshot`` of them is given) and the bank (from the disk cache the driver fills
    first, in ``cache_dir``).
    """

    def __init__(self, spec, device: str = "cpu", threads: int | None = None, cache_dir: str | None = None, snapshot: dict | None = None):
        if threads:
            torch.set_num_threads(threads)
        if cache_dir is not None:
            os.environ["MPSEARCH_CACHE_DIR"] = cache_dir  # the driver's cache, also in a Ray worker
        self.spec, self.device, self.snapshot = spec, device, snapshot
        self._ready = None

    def _loaded(self):
        if self._ready is None:
            from mpsearch.workload import Workload

            workload = Workload(self.spec, device=self.device)
            if self.snapshot is not None:
                workload.adopt(self.snapshot)
                self.snapshot = None
            self._ready = (workload, workload.candidate_bank(), workload.build_model())
        return self._ready

    def score(self, plan: Plan | Mapping[str, int], split: Split = "evaluation", partial: bool = False) -> float:
        workload, bank, model = self._loaded()
        with bank.applied(model, plan, partial):
            return workload.loss(model, split)

    def score_batch(self, jobs: list[tuple[int, Plan]], split: Split, partial: bool) -> list[tuple[int, float]]:
        return [(i, self.score(plan, split, partial)) for i, plan in jobs]

    def evaluate(self, plan: Plan, split: Split = "evaluation") -> dict:
        """One trial: ``{loss, seconds, worker, error}``. An exception in the evaluation is
        returned, not raised, so the driver can tell it from a worker that died."""
        start = time.perf_counter()
        worker = f"{socket.gethostname()}:{os.getpid()}"
        try:
            loss = self.score(plan, split)
        except Exception as e:  # noqa: BLE001 - reported as the trial's failure reason
            from mpsearch.errors import first_line

            return {"loss": None, "seconds": time.perf_counter() - start, "worker": worker, "error": f"{type(e).__name__}: {first_line(e)}"}
        return {"loss": loss, "seconds": time.perf_counter() - start, "worker": worker, "error": None}

    def placement(self) -> dict:
        """Where this scorer runs: its process, device, and the GPUs Ray gave it (nothing is loaded)."""
        placed = {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        try:
            import ray

            placed["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        except Exception:  # noqa: BLE001 - outside Ray
            placed["gpu_ids"] = []
        return placed

    def pid(self) -> int:
        return os.getpid()
