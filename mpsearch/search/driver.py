"""The search driver: one Optuna study, ask/tell, plans scored on a pool of Ray actors.

The driver is the only process that writes trials. For each trial it asks the study
(whose sampler proposes a plan already repaired to fit; see :mod:`mpsearch.search.sampler`),
records the plan, its exact bytes and bpw on the trial, sends the plan to a free actor, and
tells the study the loss when it comes back. Before any sampling it enqueues the warm
starts: the ILP plans for the Hessian score Ω and the perturbation Δloss, the greedy plan,
and every uniform plan that fits — evaluated like any other trial and reported as the
baselines.

Failures (none of them loses or duplicates a finished trial):

* an exception or a non-finite loss in an evaluation: the trial fails with the reason and
  the study goes on;
* an actor that dies, or a trial past ``trial_timeout_s``: the trial fails with the reason,
  the actor is replaced, and the plan is enqueued again (once);
* a driver that is killed: its trials stay RUNNING in the database; ``resume`` marks them
  failed and enqueues their plans again, then runs until the study has exactly ``trials``
  complete trials.

With ``synchronous`` (the default) trials go out in rounds of one per actor and are told
in trial order when the round is back, so a seeded search proposes the same plans however
the actors' timings fall; without it a free actor gets the next trial at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from mpsearch.errors import MPSearchError
from mpsearch.hashing import json_digest
from mpsearch.search.allocate import Costs, greedy, ilp
from mpsearch.search.sampler import ATTR_PROPOSAL, RepairingSampler, make_sampler, search_space
from mpsearch.storage.store import ATTR_BPW, ATTR_BYTES, ATTR_ERROR, ATTR_PLAN

ATTR_SOURCE = "source"
ATTR_WORKER = "worker"
ATTR_EVAL_S = "eval_s"
ATTR_RERUN_OF = "rerun_of"
ATTR_CACHED = "cached"
ATTR_RERUN = "rerun"  # on a failed trial: its plan is to run again
STUDY_ATTR = "mpsearch"
SAMPLED = "sampler"


def default_study_name(spec, pareto: bool = False) -> str:
    budget = spec.budget.to_budget()
    return f"{spec.name or 'study'}-{budget}{'-pareto' if pareto else ''}"


@dataclass
class Outcome:
    """What ``mpsearch search`` reports (``search --json`` in DESIGN.md)."""

    study: str
    n_complete: int
    budget_bytes: int
    best: dict | None
    baselines: dict[str, dict]
    pareto: list[dict] = field(default_factory=list)
    n_failed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        doc = {
            "study": self.study,
            "n_complete": self.n_complete,
            "n_failed": self.n_failed,
            "budget_bytes": self.budget_bytes,
            "best": self.best,
            "baselines": self.baselines,
            "seconds": self.seconds,
        }
        if self.pareto:
            doc["pareto"] = self.pareto
        return doc


@dataclass
class _Flight:
    trial: Any  # optuna.Trial
    plan: dict
    slot: int
    ref: Any
    started: float


class Search:
    """One search: see the module docstring. ``run()`` returns the :class:`Outcome`."""

    def __init__(
        self,
        workload,
        storage,
        *,
        study: str | None = None,
        trials: int | None = None,
        workers: int | None = None,
        address: str | None = None,
        resume: bool = False,
        pareto: bool = False,
        progress: bool = False,
        trial_timeout_s: float = 600.0,
        poll_s: float = 1.0,
    ):
        spec = workload.spec
        self.workload = workload
        self.storage = storage
        self.spec = spec
        self.pareto = pareto
        self.study_name = study or default_study_name(spec, pareto)
        self.trials = trials if trials is not None else spec.search.trials
        self.workers = workers if workers is not None else spec.search.workers
        self.address = address
        self.resume = resume
        self.progress = progress
        self.trial_timeout_s = trial_timeout_s
        self.poll_s = poll_s
        self.table = workload.layer_table()
        self.budget = self.table.budget_bytes(spec.budget.to_budget())
        self.fill = spec.search.fill and not pareto
        self.pool = None
        self.scores: dict[str, dict] = {}

    # -- set-up ----------------------------------------------------------------------

    def _meta(self) -> dict:
        s = self.spec
        return {
            "format_version": 1,
            "spec_digest": json_digest({k: s.model_dump(mode="json")[k] for k in ("model", "data", "loss", "quant", "layers")}),
            "budget_bytes": self.budget,
            "pareto": self.pareto,
            "layers": list(self.table.names),
            "menu": list(self.table.menu),
            "scheme": s.quant.model_dump(mode="json"),
            # What `mpsearch export STUDY` rebuilds the workload from (the storage URL left out).
            "spec": s.model_dump(mode="json", exclude={"storage", "base_dir"}),
            "base_dir": str(s.base_dir),
        }

    def _open_study(self, sampler):
        import optuna

        from mpsearch.storage.studies import study_names

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        where = self.storage.optuna()
        exists = self.study_name in study_names(self.storage)
        meta = self._meta()
        if exists and not self.resume:
            raise MPSearchError(
                f"study {self.study_name!r} already exists; pass --resume to continue it, or --study NAME to start another"
            )
        directions = ["minimize", "minimize"] if self.pareto else ["minimize"]
        study = optuna.create_study(study_name=self.study_name, storage=where, sampler=sampler, directions=directions, load_if_exists=True)
        found = study.user_attrs.get(STUDY_ATTR)
        if found is None:
            study.set_user_attr(STUDY_ATTR, meta)
        else:
            for key, what in (("spec_digest", "model, data, loss, quant or layers"), ("budget_bytes", "budget"), ("pareto", "--pareto"), ("layers", "layers")):
                if found.get(key) != meta[key]:
                    raise MPSearchError(
                        f"study {self.study_name!r} was made with another {what} than this spec's; "
                        "resume it with the spec it was made with, or pass --study NAME to start another"
                    )
        return study

    def _profiles(self) -> None:
        from mpsearch.sensitivity.analyze import analyze

        for method in ("hessian", "perturbation"):
            profile = analyze(self.workload, method, self.storage, pool=self.pool, progress=self.progress)
            self.scores[method] = {row["name"]: {int(b): v for b, v in row["score"].items()} for row in profile.layers}

    def baselines(self) -> list[tuple[str, np.ndarray]]:
        """The warm-start plans, by name, in the order they are enqueued."""
        by_delta = Costs.of(self.table, self.scores["perturbation"])
        by_omega = Costs.of(self.table, self.scores["hessian"])
        plans: list[tuple[str, np.ndarray]] = []
        budgets = [self.budget]
        if self.pareto:  # the front between the smallest plan and the budget: allocate at every uniform size too
            budgets += sorted({self.table.bytes(self.table.uniform(b)) for b in self.table.menu} - {self.budget})
            budgets = [b for b in budgets if b <= self.budget]
        for limit in budgets:
            suffix = "" if limit == self.budget else f"@{limit}"
            plans.append((f"ilp-perturbation{suffix}", ilp(by_delta, limit)))
            plans.append((f"ilp-hessian{suffix}", ilp(by_omega, limit)))
            plans.append((f"greedy{suffix}", greedy(by_delta, limit)))
        for bits in reversed(self.table.menu):
            uniform = self.table.uniform(bits)
            if self.table.bytes(uniform) <= self.budget:
                plans.append((f"uniform-{bits}", by_delta.index(uniform)))
        return plans

    # -- the loop --------------------------------------------------------------------

    def run(self) -> Outcome:
        from mpsearch.search.pool import ScorerPool

        start = time.perf_counter()
        self.costs = Costs.of(self.table, None)
        self.costs.check_budget(self.budget)
        self.workload.candidate_bank(progress=self.progress)  # fills the disk cache the actors read
        self.pool = ScorerPool(self.spec, self.workers, self.address, device=str(self.workload.device), snapshot=self.workload.snapshot())
        try:
            self._profiles()
            self.costs = Costs.of(self.table, self.scores["perturbation"])
            base = make_sampler(self.spec.search.sampler, self.spec.search.seed, self.costs, self.budget)
            self.study = self._open_study(RepairingSampler(base, self.costs, self.budget, fill=self.fill))
            self.space = search_space(self.costs)
            self.queue: list[tuple[dict, dict]] = []  # (user attrs, params): plans to run before sampling
            self._queued: set[int] = set()
            self._recover()
            self._enqueue_baselines()
            self._loop()
        finally:
            if self.pool is not None:
                self.pool.close()
        return self.outcome(time.perf_counter() - start)

    def _trials(self, states=None):
        return self.study.get_trials(deepcopy=False, states=states)

    def _recover(self) -> None:
        """Re-queue what a previous driver left: trials it left RUNNING (failed now, their
        plans run again) and failed trials whose re-run it never got to.

        A trial's plan is written in one transaction, so a driver killed while creating a
        trial leaves it with no parameters: never a plan, never evaluated, failed and not
        re-run.
        """
        from optuna.trial import TrialState

        for t in self._trials((TrialState.RUNNING,)):
            if set(t.params) == set(self.costs.names):
                self._fail(t.number, "the driver stopped while this trial ran (resumed)", rerun=t, always=True)
            else:
                self._fail(t.number, "the driver stopped while this trial was being created (resumed)")
        trials = self._trials()
        done = {t.user_attrs.get(ATTR_RERUN_OF) for t in trials}
        for t in trials:
            if t.state == TrialState.FAIL and t.user_attrs.get(ATTR_RERUN) and t.number not in done and t.number not in self._queued:
                self._requeue(t)

    def _enqueue_baselines(self) -> None:
        present = {t.user_attrs.get(ATTR_SOURCE) for t in self._trials()}
        fresh = [
            ({ATTR_SOURCE: name}, {n: int(j) for n, j in zip(self.costs.names, index)})
            for name, index in self.baselines()
            if name not in present
        ]
        self.queue[:0] = fresh  # warm starts first

    def _requeue(self, trial) -> None:
        attrs = {ATTR_SOURCE: trial.user_attrs.get(ATTR_SOURCE, SAMPLED), ATTR_RERUN_OF: trial.number}
        self.queue.append((attrs, dict(trial.params)))
        self._queued.add(trial.number)

    def _fail(self, number: int, reason: str, rerun=None, always: bool = False) -> None:
        """Fail the trial with ``reason``; queue ``rerun``'s plan again, once per plan unless ``always``.

        The re-run is recorded on the failed trial first, so a driver that dies before
        running it leaves a note that the next ``--resume`` reads.
        """
        from optuna.trial import TrialState

        again = rerun is not None and (always or rerun.user_attrs.get(ATTR_RERUN_OF) is None)
        trial_id = self._trial_id(number)
        self.study._storage.set_trial_user_attr(trial_id, ATTR_ERROR, reason)
        if again:
            self.study._storage.set_trial_user_attr(trial_id, ATTR_RERUN, True)
        self.study.tell(number, state=TrialState.FAIL)
        if again:
            self._requeue(rerun)

    def _trial_id(self, number: int) -> int:
        return self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)

    def _ask(self):
        if self.queue:
            attrs, params = self.queue.pop(0)
            return ask_plan(self.study, self.costs, self.table, params, attrs)
        return ask_plan(self.study, self.costs, self.table)

    def _loop(self) -> None:
        from optuna.trial import TrialState
        from tqdm.auto import tqdm

        complete = self._trials((TrialState.COMPLETE,))
        done = len(complete)
        self._seen = {json_digest(t.user_attrs.get(ATTR_PLAN)): t.values for t in complete}
        best = min((t.values[0] for t in complete), default=math.inf)
        bar = tqdm(total=self.trials, initial=min(done, self.trials), desc=f"search {self.study_name}", unit="trial", disable=not self.progress)
        flights: dict[int, _Flight] = {}  # slot -> in flight
        synchronous = self.spec.search.synchronous
        try:
            while done < self.trials or flights:
                if not flights or not synchronous:
                    for slot in range(self.pool.slots):
                        if slot in flights or done + len(flights) >= self.trials:
                            continue
                        trial, plan = self._ask()
                        cached = self._seen.get(json_digest(plan))
                        if cached is not None and trial.user_attrs.get(ATTR_SOURCE) == SAMPLED:
                            # The same plan scored before: its loss is known, nothing to run.
                            self.study._storage.set_trial_user_attr(trial._trial_id, ATTR_CACHED, True)
                            tell_plan(self.study, trial, cached)
                            done += 1
                            bar.update()
                            continue
                        ref = self.pool.submit(slot, plan)
                        flights[slot] = _Flight(trial, plan, slot, ref, time.monotonic())
                    if not flights:
                        continue
                results = self._collect(flights, all_of=synchronous)
                for slot in sorted(results, key=lambda s: flights[s].trial.number):
                    flight = flights.pop(slot)
                    loss = self._finish(flight, results[slot])
                    if loss is not None:
                        done += 1
                        best = min(best, loss)
                        bar.update()
                        bar.set_postfix(best=f"{best:.5g}")
        except BaseException:
            for flight in flights.values():  # interrupted: leave nothing RUNNING
                try:
                    self._fail(flight.trial.number, "the search was interrupted while this trial ran", rerun=flight.trial, always=True)
                except Exception:  # noqa: BLE001 - the database may be what failed; --resume recovers
                    pass
            raise
        finally:
            bar.close()

    def _collect(self, flights: dict[int, _Flight], all_of: bool) -> dict[int, dict]:
        """Results by slot: every flight (``all_of``) or at least one; each is ``evaluate``'s dict,
        or ``{"died": reason}`` for an actor that died or a trial past its timeout."""
        if self.pool.local:
            return {slot: f.ref for slot, f in flights.items()}
        import ray

        results: dict[int, dict] = {}
        while True:
            waiting = {f.ref: slot for slot, f in flights.items() if slot not in results}
            if not waiting:
                return results
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting) if all_of else 1, timeout=self.poll_s)
            for ref in ready:
                slot = waiting[ref]
                try:
                    results[slot] = ray.get(ref, timeout=self.poll_s * 10)
                except ray.exceptions.RayError as e:
                    results[slot] = {"died": f"worker died: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            now = time.monotonic()
            for slot, f in flights.items():
                if slot not in results and now - f.started > self.trial_timeout_s:
                    results[slot] = {"died": f"timed out after {self.trial_timeout_s:.0f} s"}
            if results and not all_of:
                return results
            if all_of and len(results) == len(flights):
                return results

    def _finish(self, flight: _Flight, result: dict) -> float | None:
        """Tell the study; the loss for a completed trial, None for a failed one."""
        trial = flight.trial
        if "died" in result:
            self._fail(trial.number, result["died"], rerun=trial)
            self.pool.replace(flight.slot)
            return None
        storage = self.study._storage
        storage.set_trial_user_attr(trial._trial_id, ATTR_WORKER, result["worker"])
        storage.set_trial_user_attr(trial._trial_id, ATTR_EVAL_S, round(result["seconds"], 4))
        loss = result["loss"]
        if result["error"] is not None or loss is None or not math.isfinite(loss):
            self._fail(trial.number, result["error"] or f"the loss is {loss}")
            return None
        values = [loss, float(trial.user_attrs[ATTR_BYTES])] if self.pareto else [loss]
        tell_plan(self.study, trial, values)
        self._seen[json_digest(flight.plan)] = values
        return loss

    # -- the report ------------------------------------------------------------------

    def outcome(self, seconds: float = 0.0) -> Outcome:
        return outcome(self.study, self.budget, seconds)


def _row(t) -> dict:
    return {
        "trial": t.number,
        "loss": t.values[0],
        "bytes": t.user_attrs.get(ATTR_BYTES),
        "bpw": t.user_attrs.get(ATTR_BPW),
        "source": t.user_attrs.get(ATTR_SOURCE),
    }


def outcome(study, budget: int | None = None, seconds: float = 0.0) -> Outcome:
    """The study's best trial (within the budget), its baselines, and for two objectives its front."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    meta = study.user_attrs.get(STUDY_ATTR, {})
    budget = budget if budget is not None else meta.get("budget_bytes")
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values and math.isfinite(t.values[0])]
    fits = [t for t in complete if budget is None or (t.user_attrs.get(ATTR_BYTES) or 0) <= budget]
    best = min(fits, key=lambda t: (t.values[0], t.number), default=None)
    baselines: dict[str, dict] = {}
    for t in complete:
        source = t.user_attrs.get(ATTR_SOURCE)
        if source and source != SAMPLED and source not in baselines:
            baselines[source] = _row(t)
    best_doc = None if best is None else {**_row(best), "plan": best.user_attrs.get(ATTR_PLAN)}
    front = []
    if len(study.directions) > 1:
        front = sorted((_row(t) for t in study.best_trials), key=lambda r: (r["bytes"], r["loss"]))
    return Outcome(
        study=study.study_name,
        n_complete=len(complete),
        budget_bytes=budget,
        best=best_doc,
        baselines=baselines,
        pareto=front,
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        seconds=seconds,
    )


def ask_plan(study, costs: Costs, table, params: Mapping[str, int] | None = None, attrs: Mapping[str, Any] | None = None):
    """A new RUNNING trial with its whole plan: ``params`` as given, else the sampler's.

    Mirrors ``Study.ask`` (create, ``before_trial``, relative sampling) but writes the
    parameters and attributes in one transaction (see :func:`write_trial`): Optuna's ask
    writes them one at a time, 37 round trips for MiniLM, and a driver killed halfway
    would leave half a plan. Returns the trial (frozen) and the plan in bits.
    """
    from datetime import datetime

    from optuna.trial import FrozenTrial, TrialState

    storage = study._storage
    space = search_space(costs)
    # Study.ask and Study.tell drop the study's cached trial list; this path bypasses both, so
    # it must too, or the sampler keeps proposing from the trials it saw first.
    study._thread_local.cached_all_trials = None
    trial_id = storage.create_new_trial(study._study_id)
    number = storage.get_trial_number_from_id(trial_id)  # cached by Optuna's storage: no round trip
    started = datetime.now()

    def frozen(params_, attrs_) -> FrozenTrial:
        return FrozenTrial(
            number=number, state=TrialState.RUNNING, value=None, datetime_start=started, datetime_complete=None,
            params=dict(params_), distributions={n: space[n] for n in params_}, user_attrs=dict(attrs_), system_attrs={},
            intermediate_values={}, trial_id=trial_id,
        )

    if params is None:
        fresh = frozen({}, {})
        study.sampler.before_trial(study, fresh)
        params = study.sampler.sample_relative(study, fresh, space)
        attrs = {ATTR_SOURCE: SAMPLED, ATTR_PROPOSAL: getattr(study.sampler, "last_proposal", None), **(attrs or {})}
    index = np.array([params[n] for n in costs.names], dtype=np.int64)
    plan = costs.plan(index)
    attrs = {**(attrs or {}), ATTR_PLAN: plan, ATTR_BYTES: costs.bytes_of(index), ATTR_BPW: table.bpw(plan)}
    write_trial(storage, trial_id, params, space, attrs)
    return frozen(params, attrs), plan


def tell_plan(study, trial, values: list[float]) -> None:
    """Complete ``trial`` (the frozen trial :func:`ask_plan` returned) with finite ``values``.

    What ``Study.tell`` does for a complete trial — the sampler's ``after_trial``, then the
    state and values in one write — without reading the trial back first: the driver holds
    it already, and the values are checked finite before they get here.
    """
    from optuna.trial import TrialState

    values = [float(v) for v in values]
    try:
        study.sampler.after_trial(study, trial, TrialState.COMPLETE, values)
    finally:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, values)
        study._thread_local.cached_all_trials = None  # as Study.tell does: the next proposal sees this trial


def write_trial(storage, trial_id: int, params: Mapping[str, int], space: Mapping, user_attrs: Mapping[str, Any]) -> None:
    """Every parameter and user attribute of a fresh RUNNING trial, in one transaction.

    On Optuna's RDB storage: two multi-row INSERTs into its ``trial_params`` and
    ``trial_user_attributes`` tables, rows exactly as Optuna writes them (the distributions
    are the study's own, so Optuna's per-parameter compatibility query is not needed).
    Elsewhere: the public per-row calls.
    """
    import json

    from optuna.distributions import distribution_to_json

    backend = getattr(storage, "_backend", storage)
    engine = getattr(backend, "engine", None)
    if engine is None:  # pragma: no cover - not an RDB storage
        for name, value in params.items():
            storage.set_trial_param(trial_id, name, float(value), space[name])
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return
    from optuna.storages._rdb import models

    param_rows = [
        {"trial_id": trial_id, "param_name": name, "param_value": float(value), "distribution_json": distribution_to_json(space[name])}
        for name, value in params.items()
    ]
    attr_rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in user_attrs.items()]
    with engine.begin() as connection:
        connection.execute(models.TrialParamModel.__table__.insert(), param_rows)
        if attr_rows:
            connection.execute(models.TrialUserAttributeModel.__table__.insert(), attr_rows)
