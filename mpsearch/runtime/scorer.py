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
    unless a ``snapshot`` of them is given, or the ``workload`` itself in the driver's process)
    and the bank (from the disk cache the driver fills first, in ``cache_dir``).

    The scorer borrows the workload's model (:meth:`~mpsearch.workload.Workload.lend_model`): one
    copy of the weights, into which each plan is delta-swapped from the packed bank. A partial
    plan (a perturbation scan's one layer) keeps the other layers' FP weights; a whole plan gives
    the FP weights up, since a search never needs them again.
    """

    def __init__(self, spec, device: str = "cpu", threads: int | None = None, cache_dir: str | None = None, snapshot: dict | None = None, workload=None):
        if threads:
            torch.set_num_threads(threads)
        if cache_dir is not None:
            os.environ["MPSEARCH_CACHE_DIR"] = cache_dir  # the driver's cache, also in a Ray worker
        self.spec, self.device, self.snapshot = spec, device, snapshot
        self._workload = workload
        self._ready = None

    def _loaded(self):
        if self._ready is None:
            from mpsearch.workload import Workload

            workload = self._workload or Workload(self.spec, device=self.device)
            if self.snapshot is not None:
                workload.adopt(self.snapshot)
                self.snapshot = None
            bank = workload.candidate_bank()
            self._ready = (workload, bank, workload.lend_model())
        return self._ready

    def score(self, plan: Plan | Mapping[str, int], split: Split = "evaluation", partial: bool = False, metrics: bool = False, batches: tuple[int, int] | None = None):
        """The loss of ``plan`` on ``split`` (with ``metrics``: the whole :class:`~mpsearch.workload.Evaluation`),
        or on its batches ``start:stop`` (one stage of a trial)."""
        workload, bank, model = self._loaded()
        bank.apply(model, plan, partial=partial, keep_fp=partial)
        start, stop = batches or (0, None)
        # A partial plan leaves every other layer FP: the blocks before its first layer need not run.
        result = workload.evaluate(model, split, perplexity=metrics, start=start, stop=stop, quantized=list(plan) if partial else None)
        return result if metrics else result.loss

    def call(self, fn, *args, **kwargs):
        """``fn(workload, *args, **kwargs)`` on this scorer's workload, its model still FP: work
        that needs the workload's device (the bank, reference outputs, Hessian traces)."""
        from mpsearch.workload import Workload

        if self._ready is not None:
            raise RuntimeError("Scorer.call runs before the first plan: the model is lent out after it")
        if self._workload is None:
            self._workload = Workload(self.spec, device=self.device)
            if self.snapshot is not None:
                self._workload.adopt(self.snapshot)
                self.snapshot = None
        return fn(self._workload, *args, **kwargs)

    def score_batch(self, jobs: list[tuple[int, Plan]], split: Split, partial: bool, batches: tuple[int, int] | None = None) -> list[tuple[int, float]]:
        return [(i, self.score(plan, split, partial, batches=batches)) for i, plan in jobs]

    def evaluate(self, plan: Plan, split: Split = "evaluation", batches: tuple[int, int] | None = None) -> dict:
        """One trial, or one stage of it (the split's batches ``start:stop``): ``{loss, terms,
        seconds, worker, error}``, ``terms`` being the per-batch sums the driver adds a staged
        trial up from. An exception in the evaluation is returned, not raised, so the driver can
        tell it from a worker that died."""
        start = time.perf_counter()
        worker = f"{socket.gethostname()}:{os.getpid()}"
        try:
            result = self.score(plan, split, metrics=True, batches=batches)
        except Exception as e:  # noqa: BLE001 - reported as the trial's failure reason
            from mpsearch.errors import first_line

            return {"loss": None, "seconds": time.perf_counter() - start, "worker": worker, "error": f"{type(e).__name__}: {first_line(e)}"}
        return {"loss": result.loss, "terms": result.terms, "metrics": result.metrics(), "seconds": time.perf_counter() - start, "worker": worker, "error": None}

    def adopt(self, snapshot) -> None:
        """Take the batches and reference outputs another scorer computed (before the first plan)."""
        if self._ready is None:
            if self._workload is not None:
                self._workload.adopt(snapshot)
            else:
                self.snapshot = snapshot

    def close(self) -> None:
        """Give the borrowed model back to the workload when its FP weights can all be put back."""
        if self._ready is not None:
            workload, bank, model = self._ready
            if bank.holds_fp(model):
                workload.return_model(bank.restore(model))
            self._ready = None

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
