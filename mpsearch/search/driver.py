"""The search driver: one Optuna study, ask/tell through the trial log, plans scored on a pool of Ray actors.

The driver is the only process that writes trials, and it writes them through the trial log
(:mod:`mpsearch.storage.trials`). For each trial it asks the log for a plan (the sampler's,
already repaired to fit; see :mod:`mpsearch.search.sampler`), sends the plan to a free actor
and tells the log the loss when it comes back. Before any sampling it runs the warm starts: the
ILP plans for the Hessian score Ω and the perturbation Δloss, the greedy plan, and every uniform
plan that fits — evaluated like any other trial and reported as the baselines.

Failures (none of them loses or duplicates a finished trial):

* an exception or a non-finite loss in an evaluation: the trial fails with the reason and the
  study goes on;
* an actor that dies, or a trial past ``trial_timeout_s``: the trial fails with the reason, the
  actor is replaced, and the plan runs again (once);
* a driver that is killed: its trials stay RUNNING in the database; ``resume`` marks them failed
  and runs their plans again, then runs until the study has exactly ``trials`` complete trials;
* trials that fail one after another (``failure_limit`` in a row, every actor's trial more than
  once): nothing is going to complete, so the search stops with the last reason and can be
  resumed once the cause is fixed.

With ``synchronous`` (the default) trials go out in rounds of one per actor and are told in
trial order when the round is back, so a seeded search proposes the same plans however the
actors' timings fall; without it a free actor gets the next trial at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from mpsearch.errors import MPSearchError, SpecError, death_cause, first_line
from mpsearch.plan import Plan
from mpsearch.search.allocate import Costs, greedy, ilp, relinearised, single_switches
from mpsearch.search.pruner import PrunerContext, make_pruner, pruner_factory, stage_bounds
from mpsearch.search.sampler import SamplerContext, make_sampler, sampler_factory
from mpsearch.search.space import space_for
from mpsearch.storage.lease import Lease
from mpsearch.storage.trials import (
    ALSO, BYTES, CACHED, EVAL_S, FIDELITY, RELINEARISED, RERUN_OF, SAMPLED, SOURCE, WORKER, Outcome, Requeue, Running, TrialLog,
    best_of, check_study_name, study_meta, study_names,
)
from mpsearch.workload import Evaluation

log = logging.getLogger(__name__)

# The study's record is checked on --resume: these must match the spec's.
_RESUME_KEYS = (("spec_digest", "model, data, loss, quant or layers"), ("budget_bytes", "budget"), ("pareto", "--pareto"), ("layers", "layers"))


def driver_device(spec, workers: int | None = None, device: str | None = None) -> str | None:
    """Where the driver's own workload runs: ``device`` if given, else the spec's; but the CPU when
    every plan is scored in Ray workers with GPUs (the driver then needs none)."""
    workers = spec.search.workers if workers is None else workers
    if device is None and workers > 0 and spec.search.gpus_per_worker > 0:
        return "cpu"
    return device


def warm_start_scores(profiles: dict, use_flagged: bool = False) -> dict[str, dict]:
    """Each profile's scores for the warm starts, by method. A profile with flagged layers (a
    negative trace, one still moving at the probe limit) is left out unless ``use_flagged``."""
    scores = {}
    for method, profile in profiles.items():
        flagged = [row for row in profile.layers if row.get("flags")]
        if flagged and not use_flagged:
            log.warning(
                "the %s profile flags %d layers (%s: %s); its warm start is left out (search.flagged_warm_starts = true keeps it)",
                method, len(flagged), flagged[0]["name"], ", ".join(flagged[0]["flags"]),
            )
            continue
        scores[method] = profile.scores()
    return scores


_WARM_START_ORDER = ("perturbation", "hessian", "fisher")  # the order the ILP warm starts run in


def _warm_start_rank(method: str) -> tuple[int, str]:
    return (_WARM_START_ORDER.index(method) if method in _WARM_START_ORDER else len(_WARM_START_ORDER), method)


def check_profiles(methods) -> None:
    """Refuse a ``search.profiles`` entry that is no sensitivity method, before anything starts."""
    from mpsearch.sensitivity import SENSITIVITY

    for method in methods:
        if method not in SENSITIVITY:
            raise SpecError("search.profiles", f"unknown sensitivity method {method!r}; choose from: {', '.join(SENSITIVITY.names())}")


def repair_scores(scores: dict[str, dict], methods) -> dict | None:
    """The profile proposals are repaired by: the perturbation Δloss when it was measured (a loss
    change, the unit of the budget trade-off), else the first of ``methods`` that was."""
    return scores.get("perturbation") or next((scores[m] for m in methods if m in scores), None)


def default_study_name(spec, pareto: bool = False) -> str:
    budget = spec.budget.to_budget()
    return f"{spec.name or 'study'}-{budget}{'-pareto' if pareto else ''}"


@dataclass
class _Flight:
    trial: Running
    slot: int
    ref: Any
    started: float
    stage: int = 0  # the stage in flight (a staged trial; see mpsearch.search.pruner)
    terms: list = field(default_factory=list)  # the per-batch sums of its stages so far
    seconds: float = 0.0  # its stages' evaluation time so far


_NEXT_STAGE = "next stage"  # _finish: the trial went on to its next stage, still in flight
_PRUNED = "pruned"

class Search:
    """One search of ``workload``'s spec into ``storage``; :meth:`run` returns the :class:`Outcome`.

    Constructing it only records the settings: :meth:`run` opens the study, starts the actors
    (unless a ``pool`` is given, which it then uses and leaves open) and scores the trials.
    """

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
        trial_timeout_s: float | None = None,
        time_limit_s: float | None = None,
        poll_s: float = 1.0,
        pool=None,
    ):
        spec = workload.spec
        self.workload = workload
        self.storage = storage
        self.spec = spec
        self.pareto = pareto
        self.study_name = check_study_name(study or default_study_name(spec, pareto))
        self.trials = trials if trials is not None else spec.search.trials
        self.workers = workers if workers is not None else spec.search.workers
        self.address = address
        self.resume = resume
        self.progress = progress
        self.trial_timeout_s = trial_timeout_s if trial_timeout_s is not None else spec.search.trial_timeout_s
        self.time_limit_s = time_limit_s if time_limit_s is not None else spec.search.time_limit_s
        self.poll_s = poll_s
        self.fill = spec.search.fill and not pareto
        self.pool = pool
        self.scores: dict[str, dict] = {}  # the sensitivity profiles a run used, by method
        sampler_factory(spec.search.sampler)  # an unknown sampler or pruner is refused before anything starts
        pruner_factory(spec.search.pruner)
        check_profiles(spec.search.profiles)

    @property
    def budget(self) -> int:
        return self.workload.budget_bytes()

    # -- set-up ----------------------------------------------------------------------

    def meta(self) -> dict:
        """The study's record: what it was made with, checked when it is resumed."""
        s, table = self.spec, self.workload.layer_table()
        return {
            "format_version": 1,
            "spec_digest": s.digest(),
            "budget_bytes": self.budget,
            "pareto": self.pareto,
            "layers": list(table.names),
            "menu": list(table.menu),
            # How plans are the trials' Optuna parameters (mpsearch.search.space): bits on a log scale, or,
            # where the menu has scheme options (two entries of the same bits), an index into the menu.
            "space": "menu-index" if any(isinstance(w, str) for w in table.menu) else "log-bits",
            "scheme": s.quant.model_dump(mode="json"),
            # What `mpsearch export STUDY` rebuilds the workload from (the storage URL left out).
            "spec": s.model_dump(mode="json", exclude={"storage", "base_dir"}),
            "base_dir": str(s.base_dir),
        }

    def _already_done(self) -> TrialLog | None:
        """A resumed study that already has its trials, checked against this spec: its log."""
        if not self.resume or self.study_name not in study_names(self.storage):
            return None
        log = TrialLog.open(self.storage, self.study_name)
        self._check_resumed(log, self.meta())
        return log if log.n_done() >= self.trials else None

    def _check_resumed(self, log: TrialLog, meta: dict) -> None:
        found = log.meta
        unseen = self.workload.layer_table().unseen
        if unseen and found.get("layers") != meta["layers"] and set(found.get("layers") or []) == set(meta["layers"]) | set(unseen):
            raise MPSearchError(
                f"study {self.study_name!r} searched {', '.join(unseen)}, which this spec leaves out because the loss cannot see it; "
                'to resume it, add layers.unseen = "search" to the spec (the study was made before layers.unseen existed, or with it)'
            )
        for key, what in _RESUME_KEYS:
            if found.get(key) != meta[key]:
                raise MPSearchError(
                    f"study {self.study_name!r} was made with another {what} than this spec's; "
                    "resume it with the spec it was made with, or pass --study NAME to start another"
                )

    def stages(self) -> list[tuple[int, int]]:
        """``(stop batch, examples scored)`` at the end of each stage of a trial's evaluation; one
        stage (no pruning) without a pruner, for a ``--pareto`` study (Optuna prunes only single
        objectives) or with a single evaluation batch."""
        s = self.spec.search
        if s.pruner == "none":
            return []
        if self.pareto:
            log.warning("search.pruner = %r is ignored for a --pareto study: Optuna prunes single-objective studies only", s.pruner)
            return []
        sizes = [int(next(iter(b.values())).shape[0]) for b in self.workload.batches("evaluation")]
        bounds = stage_bounds(s.stages, sizes)
        return bounds if len(bounds) > 1 else []

    def _profiles(self, pool) -> dict[str, dict]:
        from mpsearch.sensitivity.analyze import analyze

        profiles = {method: analyze(self.workload, method, self.storage, pool=pool, progress=self.progress) for method in self.spec.search.profiles}
        return warm_start_scores(profiles, self.spec.search.flagged_warm_starts)

    def baselines(self, scores: dict[str, dict] | None = None) -> list[tuple[str, Plan]]:
        """The warm-start plans, by name, in the order they run (from the run's profiles by default)."""
        scores = scores or self.scores
        table = self.workload.layer_table()
        by_delta = Costs.of(table, scores.get("perturbation"))
        plans: list[tuple[str, Plan]] = []
        budgets = [self.budget]
        if self.pareto:  # the front between the smallest plan and the budget: allocate at every uniform size too
            budgets += sorted({table.bytes(table.uniform(b)) for b in table.menu} - {self.budget})
            budgets = [b for b in budgets if b <= self.budget]
        for limit in budgets:
            suffix = "" if limit == self.budget else f"@{limit}"
            for method in sorted(scores, key=_warm_start_rank):
                plans.append((f"ilp-{method}{suffix}", ilp(Costs.of(table, scores[method]), limit)))
            if "perturbation" in scores:
                plans.append((f"greedy{suffix}", greedy(by_delta, limit)))
        for bits in reversed(table.menu):
            uniform = table.uniform(bits)
            if table.bytes(uniform) <= self.budget:
                plans.append((f"uniform-{bits}", uniform))
        return plans

    def warm_starts(self, scores: dict[str, dict] | None = None) -> list[Requeue]:
        """The baselines as the trials they run as: one per distinct plan, named after the first
        warm start that gave it, with the others in ``also`` (ILP and greedy often agree)."""
        merged: dict[str, Requeue] = {}
        for name, plan in self.baselines(scores):
            first = merged.get(plan.digest())
            merged[plan.digest()] = Requeue(plan, name) if first is None else Requeue(plan, first.source, also=(*first.also, name))
        return list(merged.values())

    @contextlib.contextmanager
    def _scorers(self) -> Iterator:
        if self.pool is not None:
            yield self.pool
            return
        from mpsearch.runtime import ScorerPool

        s = self.spec.search
        if self.workers == 0:  # in this process, on the driver's own workload: one copy of the model
            device = str(self.workload.device)
        elif s.gpus_per_worker > 0:
            device = "cuda"
        else:  # workers without GPUs run on the CPU; asking for cuda there is refused by the pool
            device = "cpu" if s.device == "auto" else s.device
        with ScorerPool(
            self.spec, self.workers, self.address, device=device, gpus_per_worker=s.gpus_per_worker, workload=self.workload if self.workers == 0 else None
        ) as pool:
            yield pool

    # -- the run ---------------------------------------------------------------------

    def run(self) -> Outcome:
        """The search, holding the study's lease (:mod:`mpsearch.storage.lease`) from before any
        work to the end: a second driver on the study is refused at once."""
        start = time.perf_counter()
        table = self.workload.layer_table()
        Costs.of(table, None).check_budget(self.budget)
        if (done := self._already_done()) is not None:  # nothing to run: no Ray, no bank, no profiles
            return self._named_unseen(done.outcome(self.budget, time.perf_counter() - start))
        with Lease(self.storage, self.study_name), self._scorers() as pool:
            pool.prepare(progress=self.progress)  # the bank (the disk cache the others read) and the reference, on the first scorer
            self.scores = self._profiles(pool)
            costs = Costs.of(table, repair_scores(self.scores, self.spec.search.profiles))
            s = self.spec.search
            meta = self.meta()
            space = space_for(study_meta(self.storage, self.study_name) or meta, costs, table)  # a resumed study keeps its own
            stages = self.stages()
            log = TrialLog.create(
                self.storage,
                self.study_name,
                meta=meta,
                directions=["minimize", "minimize"] if self.pareto else ["minimize"],
                space=space,
                sampler=make_sampler(s.sampler, SamplerContext(s.seed, costs, self.budget, space, self.fill, screen=s.screen, patience=s.patience)),
                pruner=make_pruner(s.pruner if stages else "none", PrunerContext(tuple(n for _, n in stages) or (1,))),
                writes=s.trial_writes,
                resume=self.resume,
            )
            self._check_resumed(log, meta)
            log.record_sensitivity(self.scores)  # what `mpsearch report` shows beside the plan
            loop = _Loop(
                log, pool, self.trials, self.pareto, s.synchronous, self.trial_timeout_s, self.poll_s, self.progress,
                stages=stages, costs=costs, budget=self.budget, relinearise_every=0 if self.pareto else s.relinearise_every,
                time_limit_s=self.time_limit_s,
            )
            loop.queue.extend(log.recover())
            present = {name for r in log.records() for name in r.sources}
            loop.queue[:0] = [w for w in self.warm_starts() if not {w.source, *w.also} & present]  # warm starts first
            loop.run()
            self._score_test(log, pool)
            outcome = log.outcome(self.budget, time.perf_counter() - start)
            outcome.out_of_time = loop.out_of_time
            return self._named_unseen(outcome)

    def _named_unseen(self, outcome: Outcome) -> Outcome:
        table = self.workload.layer_table()
        outcome.unseen = list(table.unseen)
        outcome.searched_unseen = any(name in table.names and name not in table.pinned for name in table.unseen)
        outcome.pinned_unseen = bool(table.pinned)
        return outcome

    def _score_test(self, trials: TrialLog, pool) -> None:
        """The best plan and every baseline, scored once on the test split (never searched on), so
        the report is not the optimistic figure the search selected on. A failure here costs the
        test losses, not the search."""
        if not self.workload.batches("test"):  # a data source with nothing left over for it
            return
        scored = trials.test_losses()
        todo = [r.plan for r in trials.final_plans(self.budget) if r.plan.digest() not in scored]
        if not todo:
            return
        try:
            losses = pool.map(todo, split="test", progress=self.progress, desc="test split")
        except Exception as e:  # noqa: BLE001
            log.warning("study %r: the final plans could not be scored on the test split (%s); the search's results stand", self.study_name, first_line(e))
            return
        trials.record_test({plan.digest(): loss for plan, loss in zip(todo, losses)})


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) and a cancel (SIGTERM) wait until the block is done, then act as they would
    have. Asking for a trial creates it in the database before its plan is written: an interrupt in
    between left a RUNNING trial the driver never held, so nothing failed it. Held for the ask, the
    interrupt finds the trial whole and in the driver's hands. Only the main thread receives signals."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    # A handler installed outside Python reads back as None and cannot be put back: left alone.
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None}
    for signum in previous:
        signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


@dataclass
class _Loop:
    """One run's trials: the queue of fixed plans, the trials in flight, what is done."""

    log: TrialLog
    pool: Any
    target: int
    pareto: bool
    synchronous: bool
    timeout_s: float
    poll_s: float
    progress: bool
    stages: list[tuple[int, int]] = field(default_factory=list)  # (stop batch, examples) per stage; empty: one pass
    costs: Costs | None = None  # the layers' bytes (re-linearisation)
    budget: int = 0
    relinearise_every: int = 0  # K: after every K trials, a re-linearised ILP plan (see _relinearise)
    time_limit_s: float | None = None  # no trial starts this long after the loop's start (search.time_limit_s)
    out_of_time: bool = False  # the time limit ended the run before its target
    queue: list[Requeue] = field(default_factory=list)
    failures: int = 0  # in a row
    repeat_limit: int = 200  # sampled repeats in a row before the search ends early

    @property
    def failure_limit(self) -> int:
        return max(8, 2 * self.pool.slots)

    def _ask(self) -> Running:
        if self.queue:
            again = self.queue.pop(0)
            attrs = {SOURCE: again.source, **({RERUN_OF: again.rerun_of} if again.rerun_of is not None else {}), **({ALSO: list(again.also)} if again.also else {})}
            return self.log.ask(again.plan, attrs)
        return self.log.ask()

    def _fail(self, trial: Running, reason: str, rerun: bool, attrs: dict | None = None) -> None:
        """Fail ``trial``; with ``rerun`` its plan runs again (the failed trial says so first, so a
        driver that dies before the re-run leaves a note that the next ``--resume`` reads)."""
        self.log.fail(trial, reason, rerun=rerun, attrs=attrs)
        if rerun:
            self.queue.append(Requeue(trial.plan, trial.source, trial.number))
        self.failures += 1
        if self.failures >= self.failure_limit:
            raise MPSearchError(
                f"the last {self.failures} trials of study {self.log.name!r} all failed (the last: {reason}); "
                "fix the cause, then run the search again with --resume"
            )

    def _abandon(self, trial: Running) -> None:
        """The search is stopping (an interrupt, a cancel, an error) with ``trial`` unfinished: fail
        it, its plan marked to run again. One try: if the database is what failed, ``--resume``
        recovers the trial instead."""
        try:
            self.log.fail(trial, "the search was interrupted while this trial ran", rerun=True, patient=False)
        except Exception:  # noqa: BLE001
            pass

    def run(self) -> None:
        from tqdm.auto import tqdm

        complete = self.log.complete()
        done = self.log.n_done()
        seen = {r.plan.digest(): list(r.values) for r in complete if r.plan is not None}
        pruned = {r.plan.digest() for r in self.log.records(("PRUNED",)) if r.plan is not None}
        repeats = 0  # sampled plans in a row that were scored before
        best = min((r.loss for r in complete), default=math.inf)
        bar = tqdm(total=self.target, initial=min(done, self.target), desc=f"search {self.log.name}", unit="trial", disable=not self.progress)
        flights: dict[int, _Flight] = {}  # slot -> in flight
        every = self.relinearise_every
        relinearise_at = (done // every + 1) * every if every else math.inf
        deadline = time.monotonic() + self.time_limit_s if self.time_limit_s else math.inf
        try:
            while done < self.target or flights:
                if done < self.target and time.monotonic() >= deadline:  # no trial starts now; those in flight land
                    log.info("study %r: the time limit (%.0f s) is up after %d trials; the trials in flight finish", self.log.name, self.time_limit_s, done)
                    self.out_of_time, self.target = True, done
                    continue
                if done >= relinearise_at:  # due: let the flights land, then measure around the best
                    if not flights:
                        self._relinearise(seen, pruned)
                        relinearise_at = done + every
                        continue
                # Every free slot gets a trial; synchronous rounds stay reproducible, since a round
                # is told in trial order before any slot is filled again.
                for slot in range(self.pool.slots):
                    if slot in flights or done + len(flights) >= self.target or done >= relinearise_at:
                        continue
                    trial = None
                    try:  # once asked the trial is this driver's: an interrupt (a local pool evaluates in submit) fails it
                        with _interrupts_held():  # an interrupt inside the ask would leave it RUNNING, unknown to the driver
                            trial = self._ask()
                        digest = trial.plan.digest()
                        cached = seen.get(digest)
                        if (cached is not None or digest in pruned) and trial.source == SAMPLED:
                            # The same plan scored (or pruned) before: the sampler learns its value
                            # again, nothing runs and the study's count of trials does not move.
                            if cached is not None:
                                self.log.tell(trial, cached, {CACHED: True})
                            else:
                                self._prune_again(trial, digest)
                            repeats += 1
                            if repeats >= self.repeat_limit:
                                log.warning(
                                    "study %r: the sampler proposed %d plans in a row that were already scored; "
                                    "stopping at %d trials (the space near the best is used up: try another sampler or budget)",
                                    self.log.name, repeats, done,
                                )
                                self.target = done
                            continue
                        repeats = 0
                        flights[slot] = _Flight(trial, slot, self._submit(slot, trial.plan, 0), time.monotonic())
                    except BaseException:
                        if trial is not None and slot not in flights:
                            self._abandon(trial)
                        raise
                if not flights:
                    continue
                results = self._collect(flights)
                for slot in sorted(results, key=lambda s: flights[s].trial.number):
                    flight = flights[slot]
                    values = self._finish(flight, results[slot])
                    if values is _NEXT_STAGE:
                        continue
                    del flights[slot]  # only now: an interrupt inside _finish still finds it in flight
                    if values is None:
                        continue
                    self.failures = 0
                    done += 1
                    bar.update()
                    if values is _PRUNED:
                        pruned.add(flight.trial.plan.digest())
                        continue
                    seen[flight.trial.plan.digest()] = values
                    best = min(best, values[0])
                    bar.set_postfix(best=f"{best:.5g}")
        except BaseException:
            for flight in flights.values():  # interrupted: leave nothing RUNNING
                self._abandon(flight.trial)
            raise
        finally:
            bar.close()

    def _collect(self, flights: dict[int, _Flight]) -> dict[int, dict]:
        """Results by slot: every flight (synchronous) or at least one; each is ``Scorer.evaluate``'s
        dict, or ``{"died": reason}`` for an actor that died or a trial past its timeout."""
        if self.pool.local:
            return {slot: f.ref for slot, f in flights.items()}
        import ray

        results: dict[int, dict] = {}
        while True:
            waiting = {f.ref: slot for slot, f in flights.items() if slot not in results}
            if not waiting:
                return results
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting) if self.synchronous else 1, timeout=self.poll_s)
            for ref in ready:
                slot = waiting[ref]
                try:
                    results[slot] = ray.get(ref, timeout=self.poll_s * 10)
                except ray.exceptions.RayError as e:
                    results[slot] = {"died": f"worker died: {type(e).__name__}: {death_cause(e)[:300]}"}
            now = time.monotonic()
            for slot, f in flights.items():
                if slot not in results and now - f.started > self.timeout_s:
                    results[slot] = {"died": f"timed out after {self.timeout_s:.0f} s"}
            if results and (not self.synchronous or len(results) == len(flights)):
                return results

    def _submit(self, slot: int, plan, stage: int):
        """The slot's evaluation of ``plan``: whole, or the batches of one stage."""
        if not self.stages:
            return self.pool.submit(slot, plan)
        start = self.stages[stage - 1][0] if stage else 0
        return self.pool.submit(slot, plan, batches=(start, self.stages[stage][0]))

    def _finish(self, flight: _Flight, result: dict):
        """Tell the log: the values of a completed trial, None for a failed one, ``_PRUNED``, or
        ``_NEXT_STAGE`` for a staged trial sent on to its next stage (its flight goes on)."""
        trial = flight.trial
        if "died" in result:
            self._fail(trial, result["died"], rerun=trial.rerun_of is None)  # a plan is run again once
            self.pool.replace(flight.slot)
            return None
        flight.seconds += result["seconds"]
        attrs = {WORKER: result["worker"], EVAL_S: round(flight.seconds, 4), **result.get("metrics", {})}
        loss = result["loss"]
        if result["error"] is None and self.stages and loss is not None:
            # The running loss over the stages so far: the same sums in the same order as one pass.
            flight.terms.extend(result["terms"])
            try:
                running = Evaluation.of_terms(flight.terms)
            except MPSearchError as e:  # a non-finite running loss
                self._fail(trial, first_line(e), rerun=False, attrs=attrs)
                return None
            step = self.stages[flight.stage][1]
            self.log.report(trial, running.loss, step)
            if flight.stage + 1 < len(self.stages):
                if trial.source == SAMPLED and self.log.should_prune(trial):
                    self.log.prune(trial, {WORKER: result["worker"], EVAL_S: round(flight.seconds, 4), FIDELITY: step})
                    return _PRUNED
                flight.stage += 1
                flight.ref, flight.started = self._submit(flight.slot, trial.plan, flight.stage), time.monotonic()
                return _NEXT_STAGE
            loss, attrs = running.loss, {**attrs, **running.metrics(), FIDELITY: step}
        if result["error"] is not None or loss is None or not math.isfinite(loss):
            self._fail(trial, result["error"] or f"the loss is {loss}", rerun=False, attrs=attrs)
            return None
        values = [loss, float(trial.attrs[BYTES])] if self.pareto else [loss]
        self.log.tell(trial, values, attrs)
        return values

    def _relinearise(self, seen: dict, pruned: set) -> None:
        """Measure the loss change of moving each layer alone one step down or up the menu from the
        best plan so far (on the first stage's batches when trials are staged: screened), re-solve
        the ILP on those local costs, and queue its plan like a warm start (source
        ``relinearised``). A failure costs the proposal, not the search."""
        best = best_of(self.log.complete(), self.budget)
        if best is None or best.plan is None or self.costs is None:
            return
        if any(e["anchor"] == best.number for e in self.log.relinearisations()):
            return  # measured around this plan already: the same costs would give the same plan
        import numpy as np

        costs = self.costs
        moves = single_switches(costs, best.plan)
        plans = [best.plan, *(costs.plan(moved) for _, _, moved in moves)]
        screen = (0, self.stages[0][0]) if self.stages else None
        try:
            losses = self.pool.map(plans, batches=screen, progress=self.progress, desc="re-linearising")
        except Exception as e:  # noqa: BLE001
            log.warning("study %r: the re-linearisation around trial %d failed (%s); the search goes on", self.log.name, best.number, first_line(e))
            return
        down, up = np.full(len(costs.names), np.nan), np.full(len(costs.names), np.nan)
        for (i, step, _), loss in zip(moves, losses[1:]):
            (down if step < 0 else up)[i] = loss - losses[0]
        plan = relinearised(costs, best.plan, down, up, self.budget)
        digest = plan.digest()
        queued = not (digest in seen or digest in pruned or any(q.plan.digest() == digest for q in self.queue))
        examples = self.stages[0][1] if self.stages else None
        self.log.record_relinearisation({"after": self.log.n_done(), "anchor": best.number, "evaluations": len(plans), "examples": examples, "digest": digest, "queued": queued})
        if queued:
            self.queue.append(Requeue(plan, RELINEARISED))
        else:  # the first-order model finds no better plan near the best (often: the best itself)
            log.info("study %r: the re-linearised plan around trial %d was scored already", self.log.name, best.number)

    def _prune_again(self, trial: Running, digest: str) -> None:
        """A sampled plan that was pruned before: pruned again at once, with its earlier running losses."""
        earlier = next(r for r in self.log.records(("PRUNED",)) if r.plan is not None and r.plan.digest() == digest)
        for step, value in sorted(earlier.intermediate.items()):
            self.log.report(trial, value, step)
        self.log.prune(trial, {CACHED: True, FIDELITY: max(earlier.intermediate)})


def outcome_of(storage, study: str) -> Outcome:
    """The :class:`Outcome` of a stored study (``mpsearch studies``, the API, the export README)."""
    return TrialLog.open(storage, study).outcome()
