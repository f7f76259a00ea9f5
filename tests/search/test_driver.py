"""The search driver on the real MiniLM, real Ray actors and real SQLite / PostgreSQL files."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from mpsearch.errors import SpecError
from mpsearch.runtime import ScorerPool
from mpsearch.search.allocate import Costs, is_maximal
from mpsearch.search.driver import Search
from mpsearch.spec import Spec
from mpsearch.storage import Storage, TrialLog
from mpsearch.storage.trials import BYTES as ATTR_BYTES
from mpsearch.storage.trials import ERROR as ATTR_ERROR
from mpsearch.storage.trials import RERUN_OF as ATTR_RERUN_OF
from mpsearch.storage.trials import SAMPLED
from mpsearch.storage.trials import SOURCE as ATTR_SOURCE
from mpsearch.storage.trials import plan_of
from mpsearch.workload import Workload

from conftest import tiny_study

MENU = (2, 3, 4, 8, 16)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """One SQLite file for the module: the sensitivity profiles are computed once and reused."""
    return tmp_path_factory.mktemp("search")


@pytest.fixture(scope="module")
def workload(study_dir):
    spec = Spec.load(tiny_study(study_dir, bits=MENU)).with_overrides(budget="3.5bpw", search={"trials": 12, "workers": 2, "seed": 0})
    spec = spec.with_overrides(data={**spec.data.model_dump(), "batch_size": 2})  # 4 evaluation batches: stages for the pruner tests
    return Workload(spec, device="cpu")


def complete(study):
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def check_plans(study, workload, budget):
    """Every evaluated plan fits, and every plan but a uniform baseline is maximal."""
    table = workload.layer_table()
    costs = Costs.of(table, None)
    evaluated = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert evaluated
    for t in evaluated:
        plan = plan_of(t.user_attrs).bits()
        assert table.bytes(plan) == t.user_attrs[ATTR_BYTES] <= budget, t.number
        assert {k: int(v) for k, v in t.params.items()} == plan, t.number  # the stored params are the plan, in bits
        if not t.user_attrs[ATTR_SOURCE].startswith("uniform-"):
            assert is_maximal(costs, costs.index(plan), budget), (t.number, t.user_attrs[ATTR_SOURCE])


def test_a_search_fits_the_budget_warm_starts_first_and_beats_its_baselines(workload, study_dir):
    storage = Storage(workload.spec.storage.url)
    search = Search(workload, storage, study="basic")
    result = search.run()
    study = optuna.load_study(study_name="basic", storage=storage.optuna())
    assert len(complete(study)) == result.n_complete == 12
    check_plans(study, workload, search.budget)
    sources = [t.user_attrs[ATTR_SOURCE] for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]
    warm = [w.source for w in search.warm_starts()]  # one trial per distinct plan
    assert sources[: len(warm)] == warm and set(sources[len(warm) :]) == {SAMPLED}
    assert {"ilp-perturbation", "ilp-hessian", "greedy", "uniform-3", "uniform-2"} == set(result.baselines)
    assert all(result.best["loss"] <= b["loss"] for b in result.baselines.values())
    # The ILP on the measured Δloss beats uniform 3-bit at a larger size, as it should.
    assert result.baselines["ilp-perturbation"]["loss"] < result.baselines["uniform-3"]["loss"]
    workers = {t.user_attrs["worker"] for t in complete(study)}
    assert len(workers) == 2  # both actors scored trials


def test_profiles_left_out_of_the_spec_are_neither_measured_nor_warm_starts(workload, tmp_path):
    """``search.profiles = ["hessian"]``: no perturbation scan (layers × menu calibration passes,
    hours for an LLM on a CPU), so no ILP on Δloss and no greedy plan; the Ω ILP and the uniform
    plans still run first, and proposals are repaired by Ω."""
    spec = workload.spec.with_overrides(search={**workload.spec.search.model_dump(), "profiles": ["hessian"], "trials": 6, "workers": 0})
    storage = Storage(f"sqlite:///{tmp_path / 'hessian-only.db'}")
    search = Search(Workload(spec, device="cpu"), storage, study="hessian-only")
    result = search.run()
    assert set(search.scores) == {"hessian"}
    assert set(result.baselines) == {"ilp-hessian", "uniform-3", "uniform-2"}
    assert result.n_complete == 6
    study = optuna.load_study(study_name="hessian-only", storage=storage.optuna())
    check_plans(study, workload, search.budget)
    with pytest.raises(SpecError, match=r"^search.profiles: unknown sensitivity method 'hesian'; choose from: .*hessian"):  # before anything starts
        Search(Workload(spec.with_overrides(search={**spec.search.model_dump(), "profiles": ["hesian"]}), device="cpu"), storage, study="typo")


def test_a_time_limit_starts_no_trial_after_it_and_resume_goes_on(workload):
    """``search.time_limit_s``: no trial starts once the trials have run that long; the one in
    flight finishes, nothing is left RUNNING, and ``--resume`` (here with the limit again) adds
    trials to the same study. ``trials`` stays the most a study runs."""
    storage = Storage(workload.spec.storage.url)
    limit = 4.0
    result = Search(workload, storage, study="timed", trials=10_000, workers=0, time_limit_s=limit).run()
    records = TrialLog.open(storage, "timed").records()
    assert result.out_of_time and result.to_json()["stopped"] == "time limit"
    assert 1 <= result.n_complete < 10_000 and {r.state for r in records} == {"COMPLETE"}
    first = min(r.started for r in records)
    # The loop's clock starts before its first trial does, so none started later than this.
    assert max((r.started - first).total_seconds() for r in records) <= limit
    resumed = Search(workload, storage, study="timed", trials=10_000, workers=0, time_limit_s=limit, resume=True).run()
    assert resumed.out_of_time and resumed.n_complete > result.n_complete
    # A limit that is not reached changes nothing: the study ends at its trials.
    untimed = Search(workload, storage, study="timed-loose", trials=6, workers=0, time_limit_s=3600).run()
    assert untimed.n_complete == 6 and not untimed.out_of_time and "stopped" not in untimed.to_json()


def test_a_worker_killed_mid_trial_is_replaced_and_its_plan_rerun(workload):
    import ray

    storage = Storage(workload.spec.storage.url)
    with ScorerPool(workload.spec, 2, snapshot=workload.snapshot()) as pool:
        submitted = []
        pool_submit = pool.submit

        def submit(slot, plan, split="evaluation"):
            ref = pool_submit(slot, plan, split)
            submitted.append(slot)
            if len(submitted) == 7:
                ray.kill(pool.actors[slot], no_restart=True)  # the real fault: the actor dies mid-trial
            return ref

        pool.submit = submit  # trials go through submit; the perturbation scan does not
        search = Search(workload, storage, study="kill", pool=pool)
        result = search.run()
    study = optuna.load_study(study_name="kill", storage=storage.optuna())
    failed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs[ATTR_ERROR].startswith("worker died")
    reruns = [t for t in complete(study) if t.user_attrs.get(ATTR_RERUN_OF) == failed[0].number]
    assert len(reruns) == 1 and plan_of(reruns[0].user_attrs) == plan_of(failed[0].user_attrs)
    assert result.n_complete == len(complete(study)) == 12
    check_plans(study, workload, search.budget)


def test_ctrl_c_while_a_trial_is_asked_fails_it_whole_and_resume_runs_its_plan(workload, monkeypatch):
    """A real SIGINT, sent by the test to its own process (as a terminal's Ctrl-C) from inside
    the 4th ask, once the plan is written and before the ask returns. That window once left a
    trial RUNNING after a handled Ctrl-C in CI: the driver never held it, so nothing failed it."""
    import os
    import signal

    real = TrialLog._write
    asks = []

    def write(self, trial_id, **rows):
        real(self, trial_id, **rows)
        if rows.get("params"):  # an ask writes the plan's parameters; a tell or a failure only attributes
            asks.append(trial_id)
            if len(asks) == 4:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TrialLog, "_write", write)
    storage = Storage(workload.spec.storage.url)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when pytest runs in the background
    try:
        with pytest.raises(KeyboardInterrupt):
            Search(workload, storage, study="ctrl-c", workers=0, trials=6).run()
    finally:
        signal.signal(signal.SIGINT, previous)
    study = optuna.load_study(study_name="ctrl-c", storage=storage.optuna())
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and not [t for t in trials if t.state == TrialState.RUNNING]
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == 3 and failed.user_attrs.get("rerun") is True and plan_of(failed.user_attrs) is not None
    monkeypatch.setattr(TrialLog, "_write", real)
    result = Search(workload, storage, study="ctrl-c", workers=0, trials=6, resume=True).run()
    study = optuna.load_study(study_name="ctrl-c", storage=storage.optuna())
    reruns = [t for t in complete(study) if t.user_attrs.get(ATTR_RERUN_OF) == 3]
    assert len(reruns) == 1 and plan_of(reruns[0].user_attrs) == plan_of(failed.user_attrs)
    assert result.n_complete == len(complete(study)) == 6


def test_a_seeded_search_is_reproducible(workload):
    storage = Storage(workload.spec.storage.url)
    runs = []
    for name in ("seeded-a", "seeded-b"):
        Search(workload, storage, study=name, workers=0).run()
        study = optuna.load_study(study_name=name, storage=storage.optuna())
        runs.append([(plan_of(t.user_attrs), t.values[0]) for t in sorted(complete(study), key=lambda t: t.number)])
    assert [p for p, _ in runs[0]] == [p for p, _ in runs[1]]
    assert np.allclose([v for _, v in runs[0]], [v for _, v in runs[1]], rtol=1e-6)
    # A different seed samples different plans after the same warm starts.
    other = workload.spec.with_overrides(search={"trials": 12, "workers": 0, "seed": 1})
    Search(Workload(other), storage, study="seeded-c").run()
    study = optuna.load_study(study_name="seeded-c", storage=storage.optuna())
    plans_c = [plan_of(t.user_attrs) for t in sorted(complete(study), key=lambda t: t.number)]
    assert plans_c != [p for p, _ in runs[0]]


def test_pareto_mode_keeps_a_front_of_loss_against_bytes(workload):
    storage = Storage(workload.spec.storage.url)
    search = Search(workload, storage, study="front", pareto=True, workers=0, trials=16)
    result = search.run()
    assert result.pareto and len(result.pareto) >= 3
    sizes = [r["bytes"] for r in result.pareto]
    losses = [r["loss"] for r in result.pareto]
    assert sizes == sorted(sizes) and all(b <= search.budget for b in sizes)
    for (s1, l1), (s2, l2) in zip(zip(sizes, losses), zip(sizes[1:], losses[1:])):
        assert l2 < l1 or (s2 == s1 and l2 == l1), (sizes, losses)  # bigger is strictly better on a front
    assert any(r["source"].startswith("ilp-perturbation@") for r in result.baselines.values())
    # Each plan is scored once and listed once. At the smallest size the ILPs, greedy and
    # uniform-2 all give the all-2-bit plan: one trial, every name on it, every name a baseline.
    assert len({r["trial"] for r in result.pareto}) == len(result.pareto)
    study = optuna.load_study(study_name="front", storage=storage.optuna())
    plans = [plan_of(t.user_attrs).digest() for t in complete(study) if not t.user_attrs.get("cached")]
    assert len(plans) == len(set(plans)) == result.n_complete == 16
    all_2 = workload.layer_table().uniform(2)
    smallest = [w for w in search.warm_starts() if w.plan.digest() == all_2.digest()]
    assert len(smallest) == 1 and {smallest[0].source, *smallest[0].also} >= {"uniform-2", f"greedy@{workload.layer_table().bytes(all_2)}"}, smallest
    names = {name for name, _ in search.baselines()}
    assert set(result.baselines) == names and len(search.warm_starts()) < len(names)
    (trial,) = [t for t in complete(study) if t.user_attrs.get(ATTR_SOURCE) == smallest[0].source]
    assert trial.user_attrs["also"] == list(smallest[0].also)


def test_losses_are_finite_and_match_a_direct_evaluation(workload):
    """A trial's recorded loss is what the workload gives for its plan, evaluated here."""
    storage = Storage(workload.spec.storage.url)
    Search(workload, storage, study="direct", workers=0, trials=6).run()
    study = optuna.load_study(study_name="direct", storage=storage.optuna())
    trial = min(complete(study), key=lambda t: t.values[0])
    bank = workload.candidate_bank()
    model = workload.build_model()
    with bank.applied(model, plan_of(trial.user_attrs)):
        direct = workload.loss(model, "evaluation")
    assert math.isfinite(direct) and direct == pytest.approx(trial.values[0], rel=1e-5)


def searched_with(workload, sampler: str, trials: int, **search):
    """A study of ``trials`` on ``sampler`` in the driver's process (seed 0), named after the
    sampler, its plans checked (they fit, and are maximal): the search and the Optuna study.
    ``search``: more of the spec's search fields."""
    spec = workload.spec.with_overrides(search={**workload.spec.search.model_dump(), "trials": trials, "workers": 0, "seed": 0, "sampler": sampler, **search})
    storage = Storage(spec.storage.url)
    search = Search(Workload(spec), storage, study=sampler)
    search.run()
    study = optuna.load_study(study_name=sampler, storage=storage.optuna())
    check_plans(study, search.workload, search.budget)
    return search, study


def test_the_evolutionary_sampler_proposes_new_maximal_plans_around_the_best(workload):
    search, study = searched_with(workload, "evo", 14)
    sampled = [t for t in complete(study) if t.user_attrs[ATTR_SOURCE] == SAMPLED]
    assert len(sampled) == 14 - len(search.warm_starts())
    # Each child differs from every plan before it.
    ordered = sorted(complete(study), key=lambda t: t.number)
    for k, t in enumerate(ordered):
        if t.user_attrs[ATTR_SOURCE] == SAMPLED:
            assert plan_of(t.user_attrs) not in [plan_of(u.user_attrs) for u in ordered[:k]], t.number
    assert not any(t.user_attrs.get("cached") for t in sampled)


def test_tpe_hands_off_to_level_switches_once_it_stalls(workload):
    """``tpe-evo``: TPE proposes until ``search.patience`` sampled trials in a row have not
    improved on the best (8 here; 32 by default), then level switches around the best propose for
    good. Each sampled trial records which proposed it, and the hand-off happened exactly where
    the rule says."""
    from mpsearch.search.sampler import PROPOSED_BY

    patience = 8
    search, study = searched_with(workload, "tpe-evo", 30, patience=patience)
    ordered = sorted(complete(study), key=lambda t: t.number)
    phases = [t.user_attrs[PROPOSED_BY] for t in ordered if t.user_attrs[ATTR_SOURCE] == SAMPLED]
    assert len(phases) == 30 - len(search.warm_starts()) and set(phases) == {"explore", "refine"}
    first = phases.index("refine")
    assert phases[first:] == ["refine"] * (len(phases) - first)  # for good
    for k, t in enumerate(ordered):  # the rule, on the trials finished before each proposal (workers=0: all of them)
        if t.user_attrs[ATTR_SOURCE] != SAMPLED:
            continue
        before = ordered[:k]
        best = min(before, key=lambda u: u.values[0])
        sampled = [u for u in before if u.user_attrs[ATTR_SOURCE] == SAMPLED]
        stalled = len(sampled) >= patience and best.number < sampled[-patience].number
        assert (t.user_attrs[PROPOSED_BY] == "refine") == (stalled or best.user_attrs.get(PROPOSED_BY) == "refine"), t.number


def test_screened_level_switches_choose_each_child_from_many(workload):
    """``evo-screened`` on the real model: after the warm starts, each child is new, fits, is
    maximal, and was chosen by the fitted model from more than one new child, and from no more
    than ``search.screen`` (8 here; 64 by default)."""
    from mpsearch.search.sampler import SCREENED

    search, study = searched_with(workload, "evo-screened", 14, screen=8)
    ordered = sorted(complete(study), key=lambda t: t.number)
    sampled = [t for t in ordered if t.user_attrs[ATTR_SOURCE] == SAMPLED]
    assert len(sampled) == 14 - len(search.warm_starts())
    screened = [t.user_attrs.get(SCREENED, 0) for t in sampled[len(search.warm_starts()):]]  # the first children are one per warm start
    assert screened and all(1 < n <= 8 for n in screened) and max(screened) == 8
    plans = [plan_of(t.user_attrs) for t in ordered]
    assert len({p.digest() for p in plans}) == len(plans)


def test_the_sampler_sees_a_window_of_the_best_and_the_latest_trials(workload):
    """The sampler models the 2 best and the 3 latest trials (a window of 2 + 3): a sampler that
    records what it was shown sees exactly those."""
    from optuna.samplers import RandomSampler

    class Recording(RandomSampler):
        seen: list[set[int]] = []

        def sample_relative(self, study, trial, search_space):
            Recording.seen.append({t.number for t in study.get_trials(deepcopy=False)})
            return {}

    storage = Storage(workload.spec.storage.url)
    Search(workload, storage, study="window", workers=0, trials=10).run()
    table = workload.layer_table()
    from mpsearch.search.space import LogBitsSpace

    log = TrialLog.open(storage, "window", space=LogBitsSpace(Costs.of(table, None), table), sampler=Recording(seed=0), window=(2, 3))
    log.ask()
    trials = sorted(complete(log.study), key=lambda t: t.number)
    best_two = {t.number for t in sorted(trials, key=lambda t: t.values[0])[:2]}
    latest = {t.number for t in trials[-3:]}
    running = {t.number for t in log.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING}
    assert Recording.seen == [best_two | latest | running]


def test_a_nan_loss_or_an_exception_fails_the_trial_and_the_study_goes_on(workload, monkeypatch):
    """A fake, said so: a real plan and model give finite losses, so the two faults are
    injected into the scorer's ``score`` for the 7th and 8th trials."""
    from mpsearch.runtime import Scorer

    calls = []
    real = Scorer.score

    def faulty(self, plan, split="evaluation", partial=False, metrics=False, batches=None):
        if split != "evaluation" or partial:  # the perturbation scan, not a trial
            return real(self, plan, split, partial, metrics, batches)
        calls.append(1)
        if len(calls) == 7:
            result = real(self, plan, split, partial, metrics, batches)
            return dataclasses.replace(result, loss=float("nan")) if metrics else float("nan")
        if len(calls) == 8:
            raise RuntimeError("simulated evaluation fault")
        return real(self, plan, split, partial, metrics, batches)

    monkeypatch.setattr(Scorer, "score", faulty)
    storage = Storage(workload.spec.storage.url)
    result = Search(workload, storage, study="faults", workers=0, trials=10).run()
    study = optuna.load_study(study_name="faults", storage=storage.optuna())
    failed = sorted((t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL), key=lambda t: t.number)
    assert [t.user_attrs[ATTR_ERROR] for t in failed] == ["the loss is nan", "RuntimeError: simulated evaluation fault"]
    assert not any(t.user_attrs.get(ATTR_RERUN_OF) is not None for t in complete(study))  # a bad plan is not re-run
    assert result.n_complete == len(complete(study)) == 10 and result.n_failed == 2


def test_the_sampler_sees_every_trial_told_so_far(workload, tmp_path):
    """The batched path bypasses Study.ask / tell, and must drop the study's trial cache as they do.

    Without that, TPE (which reads the study through that cache) kept proposing from the trials
    it first saw: the README's search ended at its best warm start instead of 0.94x of it.
    """
    from optuna.samplers import RandomSampler

    from mpsearch.search.space import LogBitsSpace

    class Recording(RandomSampler):
        seen: list = []

        def sample_relative(self, study, trial, search_space):
            # The study it is shown is the trial log's window, read through the study's trial
            # cache, as TPE reads it.
            Recording.seen.append([(t.number, t.state, t.values) for t in study.get_trials(deepcopy=False)])
            return {}

    storage = Storage(f"sqlite:///{tmp_path / 'cache.db'}")
    table = workload.layer_table()
    log = TrialLog.create(storage, "cache", meta={}, space=LogBitsSpace(Costs.of(table, None), table), sampler=Recording(seed=0))
    for value in range(4):
        log.tell(log.ask(), [float(value)])  # each ask is a proposal: the sampler reads the study
    for k, seen in enumerate(Recording.seen):
        assert seen == [(n, TrialState.COMPLETE, [float(n)]) for n in range(k)] + [(k, TrialState.RUNNING, None)], k


def test_no_trial_is_spent_on_a_plan_already_scored(tmp_path):
    """Bits (3, 8) at 5.0 bpw: TPE's repaired proposals soon repeat (measured: from the 11th
    trial on, 200 repeats in a row). The repeats are moved by level switches until new, so 16
    trials are 16 distinct plans, and the trials that needed moving say so."""
    spec = Spec.load(tiny_study(tmp_path, bits=(3, 8))).with_overrides(budget="5.0bpw", search={"trials": 16, "workers": 0, "seed": 0})
    storage = Storage(spec.storage.url)
    result = Search(Workload(spec, device="cpu"), storage, study="repeats").run()
    study = optuna.load_study(study_name="repeats", storage=storage.optuna())
    plans = [plan_of(t.user_attrs).digest() for t in complete(study)]
    assert result.n_complete == len(plans) == len(set(plans)) == 16 and result.n_repeats == 0
    assert any(t.user_attrs.get("moved") for t in complete(study) if t.user_attrs[ATTR_SOURCE] == SAMPLED)


# -- multi-fidelity: trials scored in stages, hopeless plans pruned ---------------------------


@pytest.fixture(scope="module")
def staged(workload):
    """The module's study (its 8 evaluation sentences in 4 batches), scored in stages of 2, 4 and
    8 examples and pruned by the race rule."""
    spec = workload.spec.with_overrides(search={**workload.spec.search.model_dump(), "pruner": "race", "stages": [0.25, 0.5, 1.0], "trials": 16, "workers": 0})
    return Workload(spec, device="cpu")


def staged_run(staged, name: str, **kwargs):
    storage = Storage(staged.spec.storage.url)
    result = Search(staged, storage, study=name, **kwargs).run()
    return result, TrialLog.open(storage, name).records()


def test_pruned_trials_keep_their_partial_loss_and_never_become_best(staged):
    result, records = staged_run(staged, "raced")
    pruned = [r for r in records if r.state == "PRUNED"]
    complete_ = [r for r in records if r.state == "COMPLETE"]
    assert pruned and result.n_pruned == len(pruned)
    assert result.n_complete + result.n_pruned == 16 == len(complete_) + len(pruned)
    for r in pruned:  # only sampled plans, stopped before the last stage, stored with the running loss there
        step = max(r.intermediate)
        assert r.source == SAMPLED and step < 8 and r.attrs["fidelity"] == step and r.loss == r.intermediate[step]
    for r in complete_:  # every complete trial went through all three stages
        assert sorted(r.intermediate) == [2, 4, 8] and r.attrs["fidelity"] == 8 and r.loss == r.intermediate[8]
    assert result.best["trial"] in {r.number for r in complete_}
    # However low a pruned trial's partial loss, it is not a candidate for best.
    from mpsearch.storage.trials import best_of

    lowest = dataclasses.replace(pruned[0], values=(-1.0,))
    assert best_of([*records, lowest]).number == result.best["trial"]


def test_the_stages_of_a_trial_add_up_to_its_full_loss_exactly(staged):
    _, records = staged_run(staged, "raced-sums", trials=10)
    done = [r for r in records if r.state == "COMPLETE"]
    with ScorerPool(staged.spec, 0, workload=staged) as pool:
        whole = pool.map([r.plan for r in done])  # one pass over the evaluation set
        stages = [[pool._local.score(r.plan, metrics=True, batches=b) for b in ((0, 1), (1, 2), (2, 4))] for r in done]
    from mpsearch.workload import Evaluation

    for r, loss, parts in zip(done, whole, stages):
        assert r.loss == loss  # exactly: the same sums in the same order
        assert Evaluation.of_terms([t for p in parts for t in p.terms]).loss == loss
        assert r.intermediate[2] == parts[0].loss  # the first stage's running loss is that stage alone


def test_a_resumed_study_keeps_its_pruned_trials(staged):
    _, before = staged_run(staged, "raced-resume", trials=12)
    result, after = staged_run(staged, "raced-resume", trials=16, resume=True)
    kept = {r.number: (r.state, r.values, dict(r.intermediate)) for r in before if r.state == "PRUNED"}
    assert kept and {r.number: (r.state, r.values, dict(r.intermediate)) for r in after if r.number in kept} == kept
    assert result.n_complete + result.n_pruned == 16


def test_a_seeded_search_with_the_pruner_is_reproducible(staged):
    runs = [staged_run(staged, name)[1] for name in ("raced-a", "raced-b")]
    a, b = ([(r.plan, r.state, r.values, dict(r.intermediate)) for r in run] for run in runs)
    assert a == b and any(state == "PRUNED" for _, state, _, _ in a)


def test_a_relinearisation_runs_after_every_k_trials_and_its_plan_is_no_baseline(workload):
    """After trials 6 and 12 the driver measures single-layer switches around the best plan (unless
    it measured around that plan before) and re-solves the ILP; a new plan runs next as a trial of source ``relinearised`` (on this tiny
    study the first-order model may find none better than the best itself: recorded, not run)."""
    spec = workload.spec.with_overrides(search={**workload.spec.search.model_dump(), "relinearise_every": 6, "trials": 14, "workers": 0})
    relin = Workload(spec, device="cpu")
    result, records = staged_run(relin, "relinearised")
    entries = TrialLog.open(Storage(spec.storage.url), "relinearised").relinearisations()
    afters = [e["after"] for e in entries]
    assert afters in ([6], [6, 12]) and result.n_complete == 14  # after 12 only if the best has changed since
    assert len({e["anchor"] for e in entries}) == len(entries)
    assert "relinearised" not in result.baselines
    costs = Costs.of(relin.layer_table(), None)
    layers = len(costs.names)
    by_digest = {r.plan.digest(): r for r in records if r.plan is not None}
    for e in entries:
        anchor = min((r for r in records if r.finite and r.number < e["after"]), key=lambda r: (r.loss, r.number))  # the best of the trials before
        assert e["anchor"] == anchor.number
        assert layers < e["evaluations"] <= 2 * layers + 1  # the anchor and each possible step down or up
        if e["queued"]:
            proposed = by_digest[e["digest"]]
            assert proposed.source == "relinearised" and proposed.state == "COMPLETE" and proposed.bytes <= result.budget_bytes
            moved = costs.index(proposed.plan) - costs.index(anchor.plan)
            assert moved.any() and moved.min() >= -1  # at most one step down per layer (up: a step, or more into slack)
        else:
            assert e["digest"] in by_digest  # a plan scored already
