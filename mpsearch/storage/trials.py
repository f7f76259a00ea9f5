"""The trial log: one study's trials in Optuna's own tables, read and written here and nowhere else.

A trial is one :class:`~mpsearch.plan.Plan` scored once. Its value is the loss (and, for a
``--pareto`` study, its bytes); its plan is the user attribute ``plan`` (the Plan's JSON),
beside ``bytes``, ``bpw``, ``source`` (a warm start's name or ``sampler``; ``also``: the other
warm starts that gave the same plan) and what happened to it (``worker``, ``eval_s``, ``error``,
``rerun``, ``rerun_of``, ``cached``: a sampled plan scored before, told its earlier value without
running, which counts as no trial of the study's number). Its Optuna parameters
are the plan in the sampler's terms (see :class:`PlanSpace`), so Optuna's samplers and tools
read the study as any other.

This is the only module of mpsearch that touches Optuna's private parts, and it names them:

* ``Study._storage`` and ``Study._study_id`` (the storage and id behind a study), and
  ``FrozenTrial._trial_id``;
* the RDB storage's table models (``optuna.storages._rdb.models``), for the one-transaction
  write below;
* ``Study._thread_local.cached_all_trials``, the per-thread trial cache that ``Study.ask`` and
  ``Study.tell`` drop and the batched path must drop too, or samplers read a stale study;
* ``Study._get_trials``, which :class:`_Window` overrides so the sampler models a bounded window.

Two ways to write a trial, giving the same rows (``tests/storage/test_trials.py`` runs one
scripted search through both and compares the studies ``optuna.load_study`` reads back):

* ``"batched"`` (the default): what ``Study.ask`` does — create the trial, ``before_trial``,
  relative sampling — then every parameter and attribute in one transaction. Optuna's own ask
  writes them one at a time (37 round trips for MiniLM, ~200 ms on PostgreSQL), and a process
  killed halfway leaves half a plan. ``tell`` is ``after_trial`` then the state and values.
* ``"optuna"``: ``Study.ask(fixed_distributions=...)``, ``Trial.set_user_attr`` and
  ``Study.tell``, Optuna's public path.

Old studies (mpsearch 0.1.0 stored the plan as ``{layer: bits}``) read back as plans too.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Protocol, Sequence

from mpsearch.errors import MPSearchError, NotFoundError
from mpsearch.plan import Plan
from mpsearch.storage.database import shown

if TYPE_CHECKING:
    from mpsearch.storage.store import Storage

# What mpsearch records on each trial, beside its value(s).
PLAN = "plan"
BYTES = "bytes"
BPW = "bpw"
SOURCE = "source"
ALSO = "also"  # the other warm starts whose plan this trial's is
PROPOSAL = "proposal"
WORKER = "worker"
EVAL_S = "eval_s"
ERROR = "error"
RERUN = "rerun"  # on a failed trial: its plan is to run again
RERUN_OF = "rerun_of"
CACHED = "cached"
FIDELITY = "fidelity"  # evaluation examples a trial was scored on: all of them, or a pruned trial's stages
PERPLEXITY = "perplexity"  # a causal LM's, on the evaluation split, beside the loss

STUDY_ATTR = "mpsearch"  # the study's own record (spec, budget, layers, ...), a study user attribute
RELINEARISED_ATTR = "mpsearch_relinearised"  # what each re-linearisation measured and proposed, a study user attribute
TEST_ATTR = "mpsearch_test"  # {plan digest: loss on the test split}: the final plans, scored once, a study user attribute
SENSITIVITY_ATTR = "mpsearch_sensitivity"  # {method: {layer: {bits: score}}}: the profiles the search ran on, a study user attribute
SAMPLED = "sampler"  # the source of a plan the sampler proposed
RELINEARISED = "relinearised"  # the source of a plan the ILP gave on costs measured around the best plan
SEARCHED = (SAMPLED, RELINEARISED)  # sources that are the search's own proposals, not baselines
STATES = ("COMPLETE", "RUNNING", "WAITING", "PRUNED", "FAIL")

Writes = Literal["batched", "optuna"]
WRITES: tuple[str, ...] = ("batched", "optuna")


class PlanSpace(Protocol):
    """How plans become a trial's Optuna parameters and back (the search provides it)."""

    distributions: dict[str, Any]  # parameter name -> Optuna distribution, in layer order

    def params(self, plan: Plan) -> dict[str, Any]: ...

    def plan(self, params: Mapping[str, Any]) -> Plan: ...

    def describe(self, plan: Plan) -> dict[str, Any]:
        """Attributes stored with every plan (its ``bytes`` and ``bpw``)."""
        ...


@dataclass(frozen=True)
class TrialRecord:
    """One trial as mpsearch reads it back."""

    number: int
    state: str
    values: tuple[float, ...] | None
    plan: Plan | None
    attrs: Mapping[str, Any]
    params: Mapping[str, Any]
    started: datetime | None = None
    finished: datetime | None = None
    intermediate: Mapping[int, float] = field(default_factory=dict)

    @property
    def loss(self) -> float | None:
        return self.values[0] if self.values else None

    @property
    def finite(self) -> bool:
        """Complete with finite values: a trial that can be best or on a front."""
        return self.state == "COMPLETE" and bool(self.values) and all(math.isfinite(v) for v in self.values)

    @property
    def bytes(self) -> int | None:
        return self.attrs.get(BYTES)

    @property
    def source(self) -> str | None:
        return self.attrs.get(SOURCE)

    @property
    def sources(self) -> list[str]:
        """Every warm start this trial ran for: its source and the ones that gave the same plan."""
        return [self.source, *self.attrs.get(ALSO, [])] if self.source and self.source not in SEARCHED else []

    @property
    def repeat(self) -> bool:
        """A plan scored before, told its value again: not one of the study's trials."""
        return bool(self.attrs.get(CACHED))

    def summary(self) -> dict[str, Any]:
        """``{trial, loss, bytes, bpw, source}`` (and ``perplexity`` for a causal LM): a trial as reports list it."""
        doc = {"trial": self.number, "loss": self.loss, "bytes": self.bytes, "bpw": self.attrs.get(BPW), "source": self.source}
        if PERPLEXITY in self.attrs:
            doc[PERPLEXITY] = self.attrs[PERPLEXITY]
        return doc

    def row(self) -> dict[str, Any]:
        """The `mpsearch trials` row."""
        duration = (self.finished - self.started).total_seconds() if self.finished and self.started else None
        return {
            "number": self.number,
            "state": self.state,
            "loss": self.loss,
            "bytes": self.bytes,
            "bpw": self.attrs.get(BPW),
            "duration_s": duration,
            "source": self.source,
            "worker": self.attrs.get(WORKER),
            "error": self.attrs.get(ERROR),
        }


@dataclass
class Running:
    """A trial this process asked for and has not told yet."""

    number: int
    plan: Plan
    attrs: dict[str, Any]
    _handle: Any  # the FrozenTrial (batched) or optuna.Trial (optuna) behind it
    intermediate: dict[int, float] = field(default_factory=dict)  # step (examples scored) -> running loss

    @property
    def source(self) -> str:
        return self.attrs.get(SOURCE, SAMPLED)

    @property
    def rerun_of(self) -> int | None:
        return self.attrs.get(RERUN_OF)


@dataclass(frozen=True)
class Requeue:
    """A fixed plan to run: a warm start, or the plan of a trial that failed (``rerun_of``)."""

    plan: Plan
    source: str
    rerun_of: int | None = None
    also: tuple[str, ...] = ()  # other warm starts that gave this plan


@dataclass
class Outcome:
    """What ``mpsearch search`` reports (``search --json`` in DESIGN.md): the best trial within
    the budget, the warm starts (baselines) and, for two objectives, the front."""

    study: str
    n_complete: int
    budget_bytes: int | None
    best: dict | None
    baselines: dict[str, dict]
    pareto: list[dict] = field(default_factory=list)
    n_failed: int = 0
    seconds: float = 0.0
    n_repeats: int = 0  # sampled plans scored before: told their value, not counted in n_complete
    n_pruned: int = 0  # sampled plans stopped after a stage of their evaluation (see search.pruner)
    unseen: list[str] = field(default_factory=list)  # layers the loss cannot see (the layer table's)
    searched_unseen: bool = False  # whether they were in the plan (layers.unseen = "search") or left out
    pinned_unseen: bool = False  # whether they were in the plan at 16 bits (layers.unseen = "fp16")
    out_of_time: bool = False  # search.time_limit_s ended the run before its trials

    def to_json(self) -> dict:
        doc = {
            "study": self.study,
            "n_complete": self.n_complete,
            "n_failed": self.n_failed,
            "n_repeats": self.n_repeats,
            "n_pruned": self.n_pruned,
            "budget_bytes": self.budget_bytes,
            "best": self.best,
            "baselines": self.baselines,
            "seconds": self.seconds,
        }
        if self.pareto:
            doc["pareto"] = self.pareto
        if self.out_of_time:
            doc["stopped"] = "time limit"
        if self.unseen:
            doc["unseen"] = {"layers": self.unseen, "policy": "search" if self.searched_unseen else "fp16" if self.pinned_unseen else "exclude"}
        return doc


# -- reading -------------------------------------------------------------------------------


def plan_of(attrs: Mapping[str, Any], where: str = "trial") -> Plan | None:
    """The plan a trial stored: the Plan's JSON, or mpsearch 0.1.0's ``{layer: bits}``."""
    raw = attrs.get(PLAN)
    if not raw:
        return None
    if isinstance(raw, dict) and "format_version" not in raw:  # mpsearch 0.1.0
        return Plan.of_bits(raw)
    return Plan.from_json(raw, where=f"{where}'s plan")


def _record(trial) -> TrialRecord:
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        values=tuple(trial.values) if trial.values else None,
        plan=plan_of(trial.user_attrs, where=f"trial {trial.number}"),
        attrs=trial.user_attrs,
        params=trial.params,
        started=trial.datetime_start,
        finished=trial.datetime_complete,
        intermediate=trial.intermediate_values,
    )


def best_of(records: Iterable[TrialRecord], budget: int | None = None) -> TrialRecord | None:
    """The lowest-loss complete trial within ``budget`` bytes (ties: the earlier)."""
    fits = [r for r in records if r.finite and (budget is None or (r.bytes or 0) <= budget)]
    return min(fits, key=lambda r: (r.loss, r.number), default=None)


def pareto_front(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The complete trials no other trial beats on both loss and bytes, smallest first.

    >>> from mpsearch.plan import Plan
    >>> rec = lambda n, loss, nbytes: TrialRecord(n, "COMPLETE", (loss, nbytes), None, {"bytes": nbytes}, {})
    >>> [r.number for r in pareto_front([rec(0, 0.5, 10), rec(1, 0.4, 20), rec(2, 0.6, 15), rec(3, 0.1, 30)])]
    [0, 1, 3]
    """
    done = sorted((r for r in records if r.finite and not r.repeat), key=lambda r: (r.bytes, r.loss, r.number))
    front: list[TrialRecord] = []
    plans = set()
    for r in done:
        if r.plan is not None:  # each plan once (a plan scored twice, e.g. by mpsearch before 0.3, is listed at its first trial)
            if r.plan.digest() in plans:
                continue
            plans.add(r.plan.digest())
        if not front or r.loss < front[-1].loss or (r.loss, r.bytes) == (front[-1].loss, front[-1].bytes):
            front.append(r)  # trials that tie on both are all on the front, as Optuna's best_trials has them
    return front


# -- the sampler's view --------------------------------------------------------------------


class _Window:
    """The study as the sampler sees it: the ``best`` lowest-loss and the ``recent`` latest
    finished trials, plus every trial in flight (``trials``, in number order).

    TPE's cost grows with every trial it models (about 300 ms per proposal at 5,000 trials of 37
    layers); the best and the latest carry what it learns from, so its cost stays flat as a study
    grows. Everything but the trial lists is the study's own.
    """

    def __init__(self, study, trials: list, system_attrs: dict | None = None):
        self._study = study
        self._trials = trials
        if system_attrs is not None:  # the sampler's own notes on the trial, kept for the trial's one write
            self._storage = _NotedStorage(study._storage, system_attrs)

    @classmethod
    def of_study(cls, study, best: int, recent: int) -> "_Window":
        """The window read from the study (through its trial cache)."""
        trials = study._get_trials(deepcopy=False, states=None, use_cache=True)
        finished = [t for t in trials if t.state.is_finished()]
        if len(finished) > best + recent:
            scored = [t for t in finished if t.values and t.state.name == "COMPLETE"]
            keep = {t.number for t in sorted(scored, key=lambda t: tuple(t.values))[:best]}
            keep |= {t.number for t in finished[-recent:]}
            trials = [t for t in trials if not t.state.is_finished() or t.number in keep]
        return cls(study, trials)

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy=deepcopy, states=states)


class _NotedStorage:
    """The study's storage, but ``set_trial_system_attr`` (TPE's constant liar shares its proposal
    that way) is kept in ``notes`` and written with the trial's plan, in its one transaction."""

    def __init__(self, storage, notes: dict):
        self._inner, self._notes = storage, notes

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def set_trial_system_attr(self, trial_id: int, key: str, value) -> None:
        self._notes[key] = value


class _Seen:
    """Every trial of the study as this log last wrote or read it.

    The driver is the study's only writer, so the batched path keeps the study in memory: the
    sampler's window is then built without a database read per proposal, and in time that does
    not grow with the study (the best are kept ranked, the finished in number order).
    """

    def __init__(self, trials: Iterable):
        self.trials: dict[int, Any] = {}
        self.ranked: list[tuple[tuple[float, ...], int]] = []
        self.finished: list[int] = []
        for t in trials:
            self.put(t)

    def put(self, trial) -> None:
        old = self.trials.get(trial.number)
        self.trials[trial.number] = trial
        if trial.state.is_finished() and (old is None or not old.state.is_finished()):
            bisect.insort(self.finished, trial.number)
            if trial.values and trial.state.name == "COMPLETE":  # a pruned trial's partial loss is not comparable
                bisect.insort(self.ranked, (tuple(trial.values), trial.number))

    def window(self, best: int, recent: int) -> list:
        if len(self.finished) <= best + recent:
            return [self.trials[n] for n in sorted(self.trials)]
        keep = {n for _, n in self.ranked[:best]} | set(self.finished[-recent:])
        keep |= {n for n, t in self.trials.items() if not t.state.is_finished()}
        return [self.trials[n] for n in sorted(keep)]


def _sampler_for(space: PlanSpace | None, inner, window: tuple[int, int] | None):
    """The study's sampler for a log that writes (None for one that reads)."""
    if space is None:
        return None
    if inner is None:
        import optuna

        inner = optuna.samplers.RandomSampler(seed=0)
    return _windowed_sampler(inner, space, window)


def _windowed_sampler(inner, space: PlanSpace, window: tuple[int, int] | None):
    """The study's sampler: ``inner`` proposing whole plans from a window of the study, or a fixed plan."""
    from optuna.samplers import BaseSampler

    class Windowed(BaseSampler):
        """Proposes every layer at once (``sample_relative``), from :class:`_Window`; a plan the trial
        log fixed (a warm start, a re-run) is returned as it is, so both write paths ask alike."""

        def __init__(self):
            self.inner, self.fixed = inner, None
            self.seen: _Seen | None = None  # the batched path's study in memory
            self.system_attrs: dict = {}  # what the sampler noted on the trial it proposed (batched path)

        def infer_relative_search_space(self, study, trial):
            return dict(space.distributions)

        def sample_relative(self, study, trial, search_space):
            if self.fixed is not None:
                fixed, self.fixed = self.fixed, None
                return fixed
            if not window:
                view = study
            elif self.seen is not None:
                self.system_attrs = {}
                view = _Window(study, self.seen.window(*window), self.system_attrs)
            else:
                view = _Window.of_study(study, *window)
            with warnings.catch_warnings():
                import optuna

                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                proposal = dict(self.inner.sample_relative(view, trial, dict(space.distributions)) or {})
                for name, distribution in space.distributions.items():
                    if name not in proposal:
                        proposal[name] = self.inner.sample_independent(view, trial, name, distribution)
            return proposal

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial):
            self.inner.before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self.inner.reseed_rng()

    return Windowed()


# -- the log -------------------------------------------------------------------------------


class TrialLog:
    """One study's trials. Open it with :meth:`open` (or :meth:`create`); see the module docstring.

    >>> import tempfile, pathlib
    >>> from optuna.distributions import CategoricalDistribution
    >>> from mpsearch.storage import Storage
    >>> class Bits:  # a plan space: each layer's bits as an Optuna categorical (the search's is in mpsearch.search.space)
    ...     distributions = {"fc": CategoricalDistribution([2, 4, 8])}
    ...     def params(self, plan): return plan.bits()
    ...     def plan(self, params): return Plan.of_bits(params)
    ...     def describe(self, plan): return {"bytes": 10 * plan["fc"].bits}
    >>> storage = Storage(f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'x.db'}")
    >>> log = TrialLog.create(storage, "demo", meta={"budget_bytes": 50}, space=Bits())
    >>> trial = log.ask(Plan.of_bits({"fc": 4}), {"source": "uniform-4"})
    >>> log.tell(trial, [0.25])
    >>> log.best().summary()
    {'trial': 0, 'loss': 0.25, 'bytes': 40, 'bpw': None, 'source': 'uniform-4'}
    """

    def __init__(self, storage: "Storage", study, space: PlanSpace | None, writes: Writes, sampler):
        self.storage = storage
        self.study = study
        self.space = space
        self.writes = writes
        self._sampler = sampler  # the Windowed wrapper, or None for a log that only reads
        self._live: dict[int, Any] = {}  # number -> optuna.Trial, for the "optuna" path

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        storage: "Storage",
        name: str,
        *,
        space: PlanSpace | None = None,
        sampler=None,
        pruner=None,
        writes: Writes = "batched",
        window: tuple[int, int] | None = (50, 100),
    ) -> "TrialLog":
        """The existing study ``name`` (an unknown name lists the known ones).

        Without a ``space`` the log only reads. With one it also writes: plans from ``sampler``
        (Optuna's random sampler when none is given) or fixed ones.
        """
        import optuna

        names = study_names(storage)
        if name not in names:
            known = ", ".join(names[:20]) + (" …" if len(names) > 20 else "") if names else "none yet"
            raise NotFoundError(f"no study named {name!r} in {shown(storage.url)}; known studies: {known}")
        wrapped = _sampler_for(space, sampler, window)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = storage.retrying(lambda: optuna.load_study(study_name=name, storage=storage.optuna(), sampler=wrapped, pruner=pruner), "reading")
        return cls(storage, study, space, _check_writes(writes), wrapped)

    @classmethod
    def create(
        cls,
        storage: "Storage",
        name: str,
        *,
        meta: Mapping[str, Any],
        directions: Sequence[str] = ("minimize",),
        space: PlanSpace | None = None,
        sampler=None,
        pruner=None,
        writes: Writes = "batched",
        window: tuple[int, int] | None = (50, 100),
        resume: bool = False,
    ) -> "TrialLog":
        """A new study ``name`` recording ``meta``; with ``resume`` an existing one is opened instead."""
        import optuna

        check_study_name(name)
        exists = name in study_names(storage)
        if exists and not resume:
            raise MPSearchError(f"study {name!r} already exists; pass --resume to continue it, or --study NAME to start another")
        if exists:
            return cls.open(storage, name, space=space, sampler=sampler, pruner=pruner, writes=writes, window=window)
        wrapped = _sampler_for(space, sampler, window)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = storage.retrying(
            lambda: optuna.create_study(study_name=name, storage=storage.optuna(), sampler=wrapped, pruner=pruner, directions=list(directions), load_if_exists=True),
            "writing to",
        )
        if STUDY_ATTR not in storage.retrying(lambda: study.user_attrs, "reading"):
            storage.retrying(lambda: study.set_user_attr(STUDY_ATTR, dict(meta)), "writing to")
        return cls(storage, study, space, _check_writes(writes), wrapped)

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def meta(self) -> dict[str, Any]:
        """The study's own record, as the search wrote it when it created the study."""
        return dict(self.storage.retrying(lambda: self.study.user_attrs, "reading").get(STUDY_ATTR) or {})

    @property
    def objectives(self) -> int:
        return len(self.study.directions)

    # -- writing -----------------------------------------------------------------------

    def ask(self, plan: Plan | None = None, attrs: Mapping[str, Any] | None = None) -> Running:
        """A new RUNNING trial with its whole plan: ``plan`` as given, else the sampler's proposal."""
        if self._sampler is None:
            raise MPSearchError(f"study {self.name!r} was opened to read; open it with a plan space to ask")
        attrs = dict(attrs or {})
        if plan is not None:
            self._sampler.fixed = self.space.params(plan)
            attrs.setdefault(SOURCE, SAMPLED)
        else:
            attrs[SOURCE] = SAMPLED
        if self.writes == "batched":
            handle, params = self._ask_batched()
        else:
            handle = self._retry(lambda: self.study.ask(fixed_distributions=dict(self.space.distributions)), "writing a trial to")
            params = handle.params
        if plan is None:
            plan = self.space.plan(params)
            attrs.update(getattr(self._sampler.inner, "last_notes", None) or {})
        attrs = {**attrs, PLAN: plan.to_json(), **self.space.describe(plan)}
        if self.writes == "batched":
            notes, self._sampler.system_attrs = self._sampler.system_attrs, {}
            self._write(handle._trial_id, params=params, attrs=attrs, system_attrs=notes, once=True)
            handle = _frozen_like(handle, params, self.space, attrs)
            self._sampler.seen.put(handle)
        else:
            for key, value in attrs.items():
                self._retry(lambda k=key, v=value: handle.set_user_attr(k, v), "writing to")
            self._live[handle.number] = handle
        return Running(handle.number, plan, attrs, handle)

    def _ask_batched(self):
        """``Study.ask`` up to the first write of a parameter: a trial, before_trial, the proposal."""
        from datetime import datetime

        from optuna.trial import FrozenTrial, TrialState

        study = self.study
        study._thread_local.cached_all_trials = None  # as Study.ask does: the proposal sees every trial told
        if self._sampler.seen is None:  # read the study once; from here on this log writes every change
            self._sampler.seen = _Seen(study.get_trials(deepcopy=False))
        # A retry after a commit whose answer was lost can leave an empty trial behind: never
        # evaluated, it is failed by the next resume (see recover).
        trial_id = self._retry(lambda: study._storage.create_new_trial(study._study_id), "writing a trial to")
        # The cached storage noted the new trial's number; get_trial_number_from_id would read the
        # (unfinished, so uncached) trial back from the database.
        number = study._storage._trial_id_to_study_id_and_number[trial_id][1]
        fresh = FrozenTrial(
            number=number, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(), datetime_complete=None,
            params={}, distributions={}, user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=trial_id,
        )
        self._sampler.seen.put(fresh)  # in flight from here on, as the database has it
        study.sampler.before_trial(study, fresh)
        space = study.sampler.infer_relative_search_space(study, fresh)
        params = study.sampler.sample_relative(study, fresh, space)
        return fresh, {name: params[name] for name in self.space.distributions}

    def tell(self, trial: Running, values: Sequence[float], attrs: Mapping[str, Any] | None = None) -> None:
        """Complete ``trial`` with finite ``values`` (and attributes such as its worker)."""
        from optuna.trial import TrialState

        values = [float(v) for v in values]
        if not all(math.isfinite(v) for v in values):
            raise MPSearchError(f"trial {trial.number}: values {values} are not finite; fail the trial instead")
        if self.writes == "optuna":
            handle = self._live.pop(trial.number)
            for key, value in (attrs or {}).items():
                self._retry(lambda k=key, v=value: handle.set_user_attr(k, v), "writing to")
            self._retry(lambda: self.study.tell(handle, values), "writing to", done=lambda: self._finished_as(trial.number, "COMPLETE", values))
            return
        study = self.study
        if attrs:
            self._write(trial._handle._trial_id, attrs=dict(attrs), once=True)
        try:
            study.sampler.after_trial(study, trial._handle, TrialState.COMPLETE, values)
        finally:
            self._retry(
                lambda: study._storage.set_trial_state_values(trial._handle._trial_id, TrialState.COMPLETE, values),
                "writing to",
                done=lambda: self._finished_as(trial.number, "COMPLETE", values),
            )
            study._thread_local.cached_all_trials = None  # as Study.tell does: the next proposal sees this trial
        self._sampler.seen.put(_finished(trial._handle, TrialState.COMPLETE, values, trial.intermediate))

    def report(self, trial: Running, value: float, step: int) -> None:
        """``trial``'s running loss after ``step`` evaluation examples (one stage of it): Optuna's
        intermediate value, which the study's pruner reads."""
        value = float(value)
        if self.writes == "optuna":
            self._retry(lambda: self._live[trial.number].report(value, step), "writing to")
        else:
            self._retry(lambda: self.study._storage.set_trial_intermediate_value(trial._handle._trial_id, step, value), "writing to")
        trial.intermediate[step] = value

    def should_prune(self, trial: Running) -> bool:
        """The study's pruner on ``trial`` as its last report left it."""
        if self.writes == "optuna":
            return self._live[trial.number].should_prune()
        frozen = self._retry(lambda: copy.deepcopy(self.study._storage.get_trial(trial._handle._trial_id)), "reading")
        return bool(self.study.pruner.prune(self.study, frozen))

    def prune(self, trial: Running, attrs: Mapping[str, Any] | None = None) -> None:
        """End ``trial`` as PRUNED, its value the running loss of its last report (as Optuna's
        ``tell`` does): never best, never on a front, kept by a resumed study."""
        from optuna.trial import TrialState

        step = max(trial.intermediate)
        values = [trial.intermediate[step]]
        if self.writes == "optuna":
            handle = self._live.pop(trial.number)
            for key, value in (attrs or {}).items():
                self._retry(lambda k=key, v=value: handle.set_user_attr(k, v), "writing to")
            self._retry(lambda: self.study.tell(handle, state=TrialState.PRUNED), "writing to", done=lambda: self._finished_as(trial.number, "PRUNED", None))
            return
        study = self.study
        if attrs:
            self._write(trial._handle._trial_id, attrs=dict(attrs), once=True)
        frozen = _finished(trial._handle, TrialState.PRUNED, values, trial.intermediate)
        try:
            study.sampler.after_trial(study, frozen, TrialState.PRUNED, values)
        finally:
            self._retry(
                lambda: study._storage.set_trial_state_values(trial._handle._trial_id, TrialState.PRUNED, values),
                "writing to",
                done=lambda: self._finished_as(trial.number, "PRUNED", values),
            )
            study._thread_local.cached_all_trials = None
        self._sampler.seen.put(frozen)

    def fail(self, trial: Running | int, reason: str, rerun: bool = False, attrs: Mapping[str, Any] | None = None, patient: bool = True) -> None:
        """Fail ``trial`` with ``reason``; ``rerun`` marks its plan to run again (a resumed search reads it).

        ``patient=False`` (a driver on its way out) tries once: ``--resume`` recovers what it cannot write.
        """
        from optuna.trial import TrialState

        number = trial if isinstance(trial, int) else trial.number
        note = {**(attrs or {}), ERROR: reason, **({RERUN: True} if rerun else {})}

        def write() -> None:
            if self._finished(number):  # told already (an interrupt that came just after): leave it as it ended
                return
            self._write(self._trial_id(number), attrs=note, replace=True)  # one transaction: safe to repeat
            self.study.tell(number, state=TrialState.FAIL)

        done = lambda: self._finished_as(number, "FAIL", None)  # noqa: E731
        if patient:
            self._retry(write, "writing to", done=done)
        else:
            write()
        self._live.pop(number, None)
        seen = self._sampler.seen if self._sampler is not None else None
        if seen is not None and number in seen.trials:
            seen.put(_finished(seen.trials[number], TrialState.FAIL, None))

    def set_attrs(self, trial: Running, attrs: Mapping[str, Any]) -> None:
        self._write(self._trial_id(trial.number), attrs=dict(attrs), replace=True)

    def recover(self) -> list[Requeue]:
        """What a stopped driver left: its RUNNING trials are failed (their plans to run again),
        and failed trials whose re-run it never reached are listed with them.

        A trial written by the batched path has its whole plan or nothing. One with no whole
        plan was being created when its driver stopped: never evaluated, failed, not re-run.
        """
        from optuna.trial import TrialState

        again: list[Requeue] = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            record = _record(t)
            plan = record.plan or self._whole_plan(record.params)
            if plan is None:
                self.fail(t.number, "the driver stopped while this trial was being created (resumed)")
                continue
            self.fail(t.number, "the driver stopped while this trial ran (resumed)", rerun=True)
            again.append(Requeue(plan, record.source or SAMPLED, t.number))
        queued = {r.rerun_of for r in again}
        records = self.records()
        done = {r.attrs.get(RERUN_OF) for r in records}
        for r in records:
            if r.state == "FAIL" and r.attrs.get(RERUN) and r.number not in done and r.number not in queued and r.plan is not None:
                again.append(Requeue(r.plan, r.source or SAMPLED, r.number))
        return again

    def _whole_plan(self, params: Mapping[str, Any]) -> Plan | None:
        if self.space is None or set(params) != set(self.space.distributions):
            return None
        return self.space.plan(params)

    def _trial_id(self, number: int) -> int:
        if self.writes == "optuna":
            rdb = self.storage.optuna()
            return rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(self.name), number)
        return self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)

    def _write(
        self,
        trial_id: int,
        *,
        params: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
        replace: bool = False,
        system_attrs: Mapping[str, Any] | None = None,
        once: bool = False,
    ) -> None:
        """A trial's parameters and user attributes: in one transaction (batched), else a row at a time.

        ``once``: rows that must not be written twice; a retry finds them there if the first
        attempt's commit went through.
        """
        if self.writes == "optuna":
            rdb = self.storage.optuna()
            for name, value in (params or {}).items():
                distribution = self.space.distributions[name]
                rdb.set_trial_param(trial_id, name, distribution.to_internal_repr(value), distribution)
            for key, value in (attrs or {}).items():
                rdb.set_trial_user_attr(trial_id, key, value)
            return
        args = (trial_id, params or {}, attrs or {}, replace, system_attrs or {})
        self._retry(lambda: self._write_batched(*args), "writing to", done=(lambda: self._written(trial_id, params or {}, attrs or {})) if once else None)

    def _written(self, trial_id: int, params: Mapping[str, Any], attrs: Mapping[str, Any]) -> bool:
        trial = self.storage.optuna().get_trial(trial_id)
        return set(params) <= set(trial.params) and set(attrs) <= set(trial.user_attrs)

    def _write_batched(self, trial_id: int, params: Mapping[str, Any], attrs: Mapping[str, Any], replace: bool, system_attrs: Mapping[str, Any]) -> None:
        """Rows exactly as Optuna writes them, in one transaction. The distributions are the study's
        own, so Optuna's per-parameter compatibility query is not needed. ``replace``: the
        attributes may exist already (a failure noted twice)."""
        from optuna.distributions import distribution_to_json
        from optuna.storages._rdb import models

        param_rows = [
            {
                "trial_id": trial_id,
                "param_name": name,
                "param_value": self.space.distributions[name].to_internal_repr(value),
                "distribution_json": distribution_to_json(self.space.distributions[name]),
            }
            for name, value in params.items()
        ]
        attr_rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
        system_rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in system_attrs.items()]
        table = models.TrialUserAttributeModel.__table__
        with self.storage.optuna().engine.begin() as connection:
            if param_rows:
                connection.execute(models.TrialParamModel.__table__.insert(), param_rows)
            if system_rows:
                connection.execute(models.TrialSystemAttributeModel.__table__.insert(), system_rows)
            if attr_rows:
                if replace:
                    connection.execute(table.delete().where(table.c.trial_id == trial_id, table.c.key.in_(list(attrs))))
                connection.execute(table.insert(), attr_rows)

    # -- reading -----------------------------------------------------------------------

    def records(self, states: Iterable[str] | None = None) -> list[TrialRecord]:
        """Every trial (or those in ``states``, e.g. ``("COMPLETE",)``), by number."""
        from optuna.trial import TrialState

        wanted = None if states is None else tuple(TrialState[s] for s in states)
        return [_record(t) for t in self.storage.retrying(lambda: self.study.get_trials(deepcopy=False, states=wanted), "reading")]

    # -- retries -----------------------------------------------------------------------

    def _retry(self, fn, what: str, done=None):
        """``fn()`` with a transient database error waited out (see :meth:`Storage.retrying`).

        ``done()`` says whether an earlier attempt took effect after all (its commit went through
        but the answer was lost): a retry that then fails for that reason has succeeded.
        """
        from mpsearch.storage.database import is_transient

        lost = [False]

        def attempt():
            try:
                return fn()
            except Exception as e:
                if is_transient(e):
                    lost[0] = True
                    raise
                if lost[0] and done is not None and done():
                    return None
                raise

        return self.storage.retrying(attempt, what)

    def _finished(self, number: int) -> bool:
        return self.storage.optuna().get_trial(self._trial_id(number)).state.is_finished()

    def _finished_as(self, number: int, state: str, values) -> bool:
        trial = self.storage.optuna().get_trial(self._trial_id(number))
        return trial.state.name == state and (values is None or list(trial.values or []) == [float(v) for v in values])

    def complete(self) -> list[TrialRecord]:
        """The complete trials with finite values (repeats of a plan scored before included)."""
        return [r for r in self.records(("COMPLETE",)) if r.finite]

    def n_complete(self) -> int:
        """The study's count of complete trials: distinct plans scored, no repeats."""
        return sum(not r.repeat for r in self.complete())

    def n_done(self) -> int:
        """The trials a search's ``--trials`` counts: complete or pruned, no repeats (as Optuna's
        ``n_trials`` counts pruned trials)."""
        return sum(not r.repeat for r in self.records(("COMPLETE", "PRUNED")) if r.state == "PRUNED" or r.finite)

    def best(self, budget: int | None = None) -> TrialRecord | None:
        """The lowest-loss complete trial within ``budget`` (by default the study's own)."""
        return best_of(self.complete(), self.meta.get("budget_bytes") if budget is None else budget)

    def front(self) -> list[TrialRecord]:
        """The (loss, bytes) Pareto front, smallest plan first."""
        return pareto_front(self.complete())

    def test_losses(self) -> dict[str, float]:
        """The test-split losses of the plans scored on it, by plan digest."""
        return dict(self.storage.retrying(lambda: self.study.user_attrs, "reading").get(TEST_ATTR) or {})

    def record_test(self, losses: Mapping[str, float]) -> None:
        """Add test-split losses (by plan digest) to the study's."""
        merged = {**self.test_losses(), **losses}
        self.storage.retrying(lambda: self.study.set_user_attr(TEST_ATTR, merged), "writing to")

    def sensitivity(self) -> dict[str, dict[str, dict[str, float]]]:
        """The sensitivity profiles the search's warm starts and costs came from, ``{method:
        {layer: {bits: score}}}`` (empty for a study made before they were recorded)."""
        return dict(self.storage.retrying(lambda: self.study.user_attrs, "reading").get(SENSITIVITY_ATTR) or {})

    def record_sensitivity(self, scores: Mapping[str, Mapping[str, Mapping[int, float]]]) -> None:
        def number(v) -> float | None:  # strict JSON: no NaN or infinity
            return float(v) if v is not None and math.isfinite(float(v)) else None

        doc = {method: {layer: {str(b): number(v) for b, v in row.items()} for layer, row in layers.items()} for method, layers in scores.items()}
        self.storage.retrying(lambda: self.study.set_user_attr(SENSITIVITY_ATTR, doc), "writing to")

    def relinearisations(self) -> list[dict]:
        """Each re-linearisation of the search, in order: ``after`` (trials done), ``anchor`` (the
        best trial it measured around), ``evaluations``, ``examples`` (per evaluation),
        ``digest`` (the ILP's plan) and ``queued`` (False: that plan was scored already)."""
        return list(self.storage.retrying(lambda: self.study.user_attrs, "reading").get(RELINEARISED_ATTR) or [])

    def record_relinearisation(self, entry: Mapping[str, Any]) -> None:
        entries = [*self.relinearisations(), dict(entry)]
        self.storage.retrying(lambda: self.study.set_user_attr(RELINEARISED_ATTR, entries), "writing to")

    def final_plans(self, budget: int | None = None) -> list[TrialRecord]:
        """The trials whose plans a search reports: the best within the budget and each warm start's
        first trial, one per distinct plan (what the test split scores)."""
        complete = [r for r in self.records() if r.finite and r.plan is not None]
        best = best_of(complete, budget if budget is not None else self.meta.get("budget_bytes"))
        chosen: dict[str, TrialRecord] = {}
        for r in ([best] if best is not None else []) + [r for r in complete if r.sources]:
            chosen.setdefault(r.plan.digest(), r)
        return list(chosen.values())

    def outcome(self, budget: int | None = None, seconds: float = 0.0) -> Outcome:
        """The best trial within the budget, the baselines (the first trial of each warm start) and
        the front; each with its test-split loss where the search scored it (``test_loss``)."""
        records = self.records()
        complete = [r for r in records if r.finite]
        budget = budget if budget is not None else self.meta.get("budget_bytes")
        best = best_of(complete, budget)
        tests = self.test_losses()

        def summary(r: TrialRecord) -> dict:
            doc = r.summary()
            if r.plan is not None and r.plan.digest() in tests:
                doc["test_loss"] = tests[r.plan.digest()]
            return doc

        baselines: dict[str, dict] = {}
        for r in complete:
            for name in r.sources:
                baselines.setdefault(name, summary(r))
        return Outcome(
            study=self.name,
            n_complete=sum(not r.repeat for r in complete),
            n_repeats=sum(r.repeat for r in complete),
            n_pruned=sum(r.state == "PRUNED" and not r.repeat for r in records),
            budget_bytes=budget,
            best=None if best is None else {**summary(best), "plan": best.plan.to_json() if best.plan else None},
            baselines=baselines,
            pareto=[r.summary() for r in pareto_front(complete)] if self.objectives > 1 else [],
            n_failed=sum(r.state == "FAIL" for r in records),
            seconds=seconds,
        )


MAX_STUDY_NAME = 512  # Optuna's studies.study_name column


def check_study_name(name: str) -> str:
    """``name``, if every backend can store it (checked before any work, not at the first write)."""
    if not name or not name.strip():
        raise MPSearchError("the study name is empty; pass --study NAME or give the spec a name")
    if len(name) > MAX_STUDY_NAME:
        raise MPSearchError(f"the study name is {len(name)} characters long; use at most {MAX_STUDY_NAME} (--study NAME)")
    if "\x00" in name:
        raise MPSearchError("the study name contains a NUL character; pass --study NAME without it")
    return name


def _check_writes(writes: str) -> Writes:
    if writes not in WRITES:
        raise MPSearchError(f"search.trial_writes must be one of {', '.join(WRITES)}, got {writes!r}")
    return writes  # type: ignore[return-value]


def _finished(trial, state, values, intermediate: Mapping[int, float] | None = None):
    """``trial`` (a FrozenTrial) finished in ``state`` with ``values`` (and the running losses it
    reported), as the sampler's window shows it."""
    from optuna.trial import FrozenTrial

    return FrozenTrial(
        number=trial.number, state=state, value=None, values=values, datetime_start=trial.datetime_start, datetime_complete=datetime.now(),
        params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs, system_attrs=trial.system_attrs,
        intermediate_values=dict(intermediate if intermediate is not None else trial.intermediate_values), trial_id=trial._trial_id,
    )


def _frozen_like(fresh, params: Mapping[str, Any], space: PlanSpace, attrs: Mapping[str, Any]):
    """The batched trial as Optuna would hold it after its writes (for the sampler's after_trial)."""
    from optuna.trial import FrozenTrial

    return FrozenTrial(
        number=fresh.number, state=fresh.state, value=None, datetime_start=fresh.datetime_start, datetime_complete=None,
        params=dict(params), distributions={n: space.distributions[n] for n in params}, user_attrs=dict(attrs),
        system_attrs={}, intermediate_values={}, trial_id=fresh._trial_id,
    )


# -- studies -------------------------------------------------------------------------------


def study_names(storage: "Storage") -> list[str]:
    import optuna

    return sorted(optuna.get_all_study_names(storage.optuna()))


def study_meta(storage: "Storage", name: str) -> dict[str, Any] | None:
    """The record a study was made with, or None when there is no study ``name``."""
    if name not in study_names(storage):
        return None
    return TrialLog.open(storage, name).meta


def study_rows(storage: "Storage") -> list[dict]:
    """One row per study: trial counts by state and the best (lowest-loss) complete trial."""
    rows = []
    for name in study_names(storage):
        log = TrialLog.open(storage, name)
        records = log.records()
        best = best_of(records)
        rows.append(
            {
                "name": name,
                "n_trials": len(records),
                "states": {state.lower(): sum(r.state == state for r in records) for state in STATES},
                "best": None if best is None else {"number": best.number, "loss": best.loss, "bytes": best.bytes, "bpw": best.attrs.get(BPW)},
            }
        )
    return rows


def trial_rows(storage: "Storage", name: str) -> list[dict]:
    return [r.row() for r in TrialLog.open(storage, name).records()]


def pareto_rows(storage: "Storage", name: str) -> list[dict]:
    """The Pareto-optimal complete trials of a two-objective (loss, bytes) study, smallest first."""
    log = TrialLog.open(storage, name)
    if log.objectives < 2:
        raise MPSearchError(f"study {name!r} has one objective, so no Pareto front; run `mpsearch search SPEC --pareto` for one")
    return [r.row() for r in log.front()]

