"""One driver per study: the lease, on SQLite and PostgreSQL, and two real drivers on one study."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from mpsearch.storage import Storage
from mpsearch.storage.lease import Lease, StudyBusy, holder
from mpsearch.storage.models import StudyLease, utcnow

from conftest import tiny_study


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def plant(storage: Storage, study: str, host: str, pid: int, age_s: float) -> None:
    """A lease row as another driver would have left it."""
    at = utcnow() - timedelta(seconds=age_s)
    with storage.engine.begin() as c:
        c.execute(sa.insert(StudyLease).values(study=study, holder="other", host=host, pid=pid, since=at, heartbeat_at=at))


def test_a_second_lease_is_refused_until_the_first_is_given_back(storage_url, monkeypatch):
    monkeypatch.setenv("MPSEARCH_LEASE_STALE_S", "6")  # a heartbeat a second
    storage = Storage(storage_url)
    with Lease(storage, "s") as first:
        with pytest.raises(StudyBusy, match=rf"study 's' is being searched by another driver \(host {socket.gethostname()}, pid {os.getpid()}, since "):
            Lease(storage, "s").__enter__()
        beat = holder(storage, "s").heartbeat_at
        time.sleep(2.5)
        assert holder(storage, "s").heartbeat_at > beat and not first.lost  # it heartbeats
        with Lease(storage, "other-study"):  # another study is another lease
            pass
    assert holder(storage, "s") is None
    with Lease(storage, "s"):
        assert holder(storage, "s") is not None


def test_a_dead_drivers_lease_is_taken_over(storage_url, monkeypatch):
    monkeypatch.setenv("MPSEARCH_LEASE_STALE_S", "30")
    storage = Storage(storage_url)
    plant(storage, "killed", socket.gethostname(), dead_pid(), age_s=1)  # this host, process gone: at once
    with Lease(storage, "killed"):
        assert holder(storage, "killed").pid == os.getpid()
    plant(storage, "gone-host", "a-host-that-went-away", 12345, age_s=31)  # elsewhere: once its heartbeat is stale
    with Lease(storage, "gone-host"):
        assert holder(storage, "gone-host").pid == os.getpid()
    plant(storage, "live-host", "a-busy-host", 12345, age_s=5)  # elsewhere and fresh: refused
    with pytest.raises(StudyBusy, match="host a-busy-host, pid 12345"):
        Lease(storage, "live-host").__enter__()


def test_two_drivers_on_one_study_the_second_is_refused_and_the_first_is_untouched(tmp_path, postgres_url):
    # Trials slow enough (64 evaluation sentences, ~2 s each: 24 of them) that the first driver is still running when the second starts.
    spec = tiny_study(tmp_path, bits=(2, 3, 4, 8, 16))
    spec.write_text(spec.read_text().replace("evaluation = 8", "evaluation = 64"))
    args = [sys.executable, "-m", "mpsearch", "search", str(spec), "--budget", "3.5bpw", "--trials", "24", "--workers", "0",
            "--storage", postgres_url, "--study", "shared", "--resume", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    storage = Storage(postgres_url)
    try:
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline:  # until it runs trials
            if "shared" in optuna.get_all_study_names(storage.optuna()) and optuna.load_study(study_name="shared", storage=storage.optuna()).trials:
                break
            time.sleep(0.2)
        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.returncode == 2 and "is being searched by another driver" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.returncode == 0, err[-2000:]
    assert json.loads(out)["n_complete"] == 24
    trials = optuna.load_study(study_name="shared", storage=storage.optuna()).get_trials(deepcopy=False)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 24 and not [t for t in trials if t.state != TrialState.COMPLETE]
    assert holder(storage, "shared") is None  # given back at the end
