"""The trial log: both write paths give the same study, plans are stored once, old studies read back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from torch import nn

from mpsearch.errors import MPSearchError
from mpsearch.plan import Plan
from mpsearch.quant import LayerTable, Scheme
from mpsearch.search.allocate import Costs
from mpsearch.search.pruner import RacePruner
from mpsearch.search.sampler import SamplerContext, make_sampler
from mpsearch.search.space import SPACES
from mpsearch.storage import Storage, TrialLog
from mpsearch.storage.trials import PLAN, plan_of

OLD_DB = Path(__file__).parent / "data" / "study-0.1.0.db"


@pytest.fixture(scope="module", params=["log-bits", "menu-index"])
def space(request):
    """A real layer table (three Linear layers) and monotone costs, like a sensitivity profile's,
    in each encoding of plans as Optuna parameters."""
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    table = LayerTable.from_model(model, Scheme())
    scores = {name: {b: scale * 4.0 ** -(b - 2) if b < 16 else 0.0 for b in table.menu} for name, scale in zip(table.names, (1.0, 3.0, 0.5))}
    costs = Costs.of(table, scores)
    budget = table.bytes(table.uniform(4))
    return SPACES[request.param](costs, table), costs, budget


def scripted_search(storage: Storage, name: str, writes: str, space) -> TrialLog:
    """Warm starts, a failure to run again, sampled trials scored in two stages (some pruned after
    the first), a driver that stops with a trial running, and the resume that re-runs it: every
    operation of the trial log, in one script."""
    plans, costs, budget = space
    sampler = make_sampler("tpe", SamplerContext(seed=0, costs=costs, budget=budget, space=plans))
    log = TrialLog.create(storage, name, meta={"budget_bytes": budget}, space=plans, sampler=sampler, pruner=RacePruner(keep=2), writes=writes)
    loss = lambda plan: float(costs.cost_of(plan))  # noqa: E731 - a deterministic stand-in for an evaluation
    table = plans.table
    for source, plan in (("uniform-4", table.uniform(4)), ("uniform-3", table.uniform(3))):
        trial = log.ask(plan, {"source": source})
        log.report(trial, 1.5 * loss(trial.plan), 4)
        log.report(trial, loss(trial.plan), 8)
        log.tell(trial, [loss(trial.plan)], {"worker": "w0", "eval_s": 0.5})
    failed = log.ask(table.uniform(2), {"source": "uniform-2"})
    log.fail(failed, "worker died: RayActorError", rerun=True)
    for _ in range(6):
        trial = log.ask()
        log.report(trial, 1.5 * loss(trial.plan), 4)
        if log.should_prune(trial):
            log.prune(trial, {"worker": "w1", "eval_s": 0.125, "fidelity": 4})
            continue
        log.report(trial, loss(trial.plan), 8)
        log.tell(trial, [loss(trial.plan)], {"worker": "w1", "eval_s": 0.25})
    log.ask()  # the driver stops here: this one is left RUNNING

    resumed = TrialLog.open(storage, name, space=plans, sampler=make_sampler("tpe", SamplerContext(seed=1, costs=costs, budget=budget, space=plans)), writes=writes)
    for again in resumed.recover():
        trial = resumed.ask(again.plan, {"source": again.source, "rerun_of": again.rerun_of})
        resumed.tell(trial, [loss(trial.plan)], {"worker": "w2", "eval_s": 0.125})
    return resumed


def comparable(trial) -> dict:
    """Everything Optuna stores for a trial but the clock."""
    return {
        "number": trial.number,
        "state": trial.state,
        "values": trial.values,
        "params": trial.params,
        "distributions": trial.distributions,
        "user_attrs": trial.user_attrs,
        "system_attrs": trial.system_attrs,
        "intermediate_values": trial.intermediate_values,
    }


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_batched_and_the_optuna_write_paths_give_the_same_study(backend, tmp_path, space, request):
    url = f"sqlite:///{tmp_path / 'trials.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    storage = Storage(url)
    scripted_search(storage, "batched", "batched", space)
    scripted_search(storage, "optuna", "optuna", space)
    a = optuna.load_study(study_name="batched", storage=url).get_trials()
    b = optuna.load_study(study_name="optuna", storage=url).get_trials()
    assert len(a) == len(b) == 12
    assert [comparable(t) for t in a] == [comparable(t) for t in b]
    states = [t.state.name for t in a]
    assert states.count("FAIL") == 2  # the failure, and the trial left running
    pruned = [t for t in a if t.state.name == "PRUNED"]
    assert pruned and states.count("COMPLETE") + len(pruned) == 10
    for t in pruned:  # stored with its partial loss, the running loss of its one stage
        assert t.values == [t.intermediate_values[4]] and 8 not in t.intermediate_values
    reruns = [t for t in a if "rerun_of" in t.user_attrs]
    assert sorted(t.user_attrs["rerun_of"] for t in reruns) == [2, 9]  # each run again once
    for t in reruns:
        assert plan_of(t.user_attrs) == plan_of(a[t.user_attrs["rerun_of"]].user_attrs)


def test_a_trial_stores_its_plan_once_as_the_plan_document(tmp_path, space):
    storage = Storage(f"sqlite:///{tmp_path / 'once.db'}")
    plans, costs, budget = space
    log = TrialLog.create(storage, "once", meta={"budget_bytes": budget}, space=plans)
    trial = log.ask(plans.table.uniform(8), {"source": "uniform-8"})
    log.tell(trial, [0.5])
    stored = optuna.load_study(study_name="once", storage=storage.optuna()).trials[0]
    assert Plan.from_json(stored.user_attrs[PLAN]) == plans.table.uniform(8)
    assert [k for k, v in stored.user_attrs.items() if isinstance(v, dict) and "layers" in v] == [PLAN]  # one copy
    assert plans.plan(stored.params) == plans.table.uniform(8)  # Optuna's view: the bits (or their menu index)
    assert log.best(budget=costs.bytes_of(plans.table.uniform(8))).plan == plans.table.uniform(8)
    assert log.best() is None  # the study's own budget (uniform 4-bit) is below it


def test_a_log_opened_to_read_refuses_to_write_and_an_unknown_study_lists_the_known(tmp_path, space):
    storage = Storage(f"sqlite:///{tmp_path / 'read.db'}")
    plans, _, budget = space
    TrialLog.create(storage, "known", meta={"budget_bytes": budget}, space=plans)
    with pytest.raises(MPSearchError, match="opened to read"):
        TrialLog.open(storage, "known").ask(plans.table.uniform(4))
    with pytest.raises(MPSearchError, match="no study named 'other'.*known studies: known"):
        TrialLog.open(storage, "other")
    with pytest.raises(MPSearchError, match="already exists; pass --resume"):
        TrialLog.create(storage, "known", meta={})


# -- studies written by mpsearch 0.1.0 -------------------------------------------------------


@pytest.fixture
def old_db(tmp_path) -> str:
    """A copy of a database mpsearch 0.1.0 wrote (``data/study-0.1.0.toml``, 9 + 8 trials; see
    ``data/README.md``): its trials keep the plan as ``{layer: bits}``."""
    path = tmp_path / "old.db"
    shutil.copy(OLD_DB, path)
    return f"sqlite:///{path}"


def test_an_old_study_reads_back_with_its_plans(old_db):
    Storage(old_db, check_schema=False).upgrade()  # `mpsearch db upgrade`: its schema is 0002, from before study leases
    storage = Storage(old_db, create=False)
    log = TrialLog.open(storage, "tiny-3.5bpw")
    raw = {t.number: t.user_attrs for t in optuna.load_study(study_name="tiny-3.5bpw", storage=old_db).trials}
    records = log.records()
    assert len(records) == 10 and all(isinstance(raw[r.number]["plan"], dict) and "format_version" not in raw[r.number]["plan"] for r in records)
    for r in records:
        assert r.plan.bits() == raw[r.number]["plan"]
    outcome = log.outcome()
    assert outcome.n_complete == 9 and outcome.n_failed == 1 and outcome.best["trial"] == 0
    assert Plan.from_json(outcome.best["plan"]).bits() == raw[0]["plan"]
    assert set(outcome.baselines) == {"ilp-perturbation", "ilp-hessian", "greedy", "uniform-3", "uniform-2"}
    front = TrialLog.open(storage, "tiny-front").front()
    assert len(front) >= 3 and [r.bytes for r in front] == sorted(r.bytes for r in front)


def test_old_studies_list_export_and_resume_with_this_mpsearch(old_db, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPSEARCH_STORAGE": old_db}
    run = lambda *args: subprocess.run([sys.executable, "-m", "mpsearch", *args], capture_output=True, text=True, env=env, timeout=600)  # noqa: E731
    # Its schema predates this mpsearch's: readers say how to upgrade it, and that works with its data.
    refused = run("studies")
    assert refused.returncode == 2 and "run `mpsearch db upgrade" in refused.stderr, refused.stderr[-2000:]
    assert run("db", "upgrade").returncode == 0
    listed = run("studies", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(listed.stdout)["studies"]}
    assert rows["tiny-3.5bpw"]["states"]["complete"] == 9 and rows["tiny-3.5bpw"]["best"]["number"] == 0
    trials = json.loads(run("trials", "tiny-3.5bpw", "--json").stdout)["trials"]
    assert [t["source"] for t in trials[:2]] == ["ilp-perturbation", "ilp-hessian"]

    # The export rebuilds the study's workload from the spec the study recorded and checks the loss.
    exported = run("export", "tiny-3.5bpw", "--out", str(tmp_path / "export"), "--json")
    assert exported.returncode == 0, exported.stderr[-2000:]
    doc = json.loads(exported.stdout)
    assert doc["trial"] == 0 and doc["verified_loss"] == pytest.approx(doc["loss"], rel=1e-4)

    # Resumed, the old study gains trials in the new format beside its old ones. It searched the
    # pooler, which the loss cannot see and this version leaves out by default: the spec says to keep it.
    spec = tmp_path / "study.toml"
    shutil.copy(OLD_DB.with_suffix(".toml"), spec)
    refused = run("search", str(spec), "--trials", "11", "--workers", "0", "--resume")
    assert refused.returncode == 2 and 'add layers.unseen = "search"' in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    spec.write_text(spec.read_text() + '[layers]\nunseen = "search"\n')
    resumed = run("search", str(spec), "--trials", "11", "--workers", "0", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["n_complete"] == 11
    attrs = [t.user_attrs for t in optuna.load_study(study_name="tiny-3.5bpw", storage=old_db).trials]
    assert sum("format_version" in a["plan"] for a in attrs) == 2 and len(attrs) == 12
