"""The real fault: PostgreSQL restarted in the middle of a search.

The search waits the restart out and finishes with exactly the trials it was asked for; nothing
is lost, duplicated or left running, and nothing is printed as a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mpsearch.storage import Storage
from mpsearch.storage.trials import plan_of

from conftest import tiny_study

MENU = (2, 3, 4, 8, 16)
TRIALS = 24


def restart_postgresql() -> float:
    """Restart the machine's PostgreSQL cluster (as `pg_ctlcluster ... restart` does on a server); seconds taken."""
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    start = time.monotonic()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True, capture_output=True, timeout=120)
    return time.monotonic() - start


def complete(storage: Storage, study: str) -> int:
    if study not in optuna.get_all_study_names(storage.optuna()):
        return 0
    return sum(t.state == TrialState.COMPLETE for t in optuna.load_study(study_name=study, storage=storage.optuna()).get_trials(deepcopy=False))


def started(args: list[str], env: dict, url: str, study: str, at_least: int) -> tuple[subprocess.Popen, Storage]:
    """A search driver, once it has ``at_least`` complete trials (and is still running)."""
    driver = subprocess.Popen([sys.executable, "-m", "mpsearch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    storage = Storage(url)
    deadline = time.monotonic() + 300
    while complete(storage, study) < at_least and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, "the search ended before the fault"
    storage.engine.dispose()  # this test's own connections go with the fault too
    return driver, storage


def test_a_search_waits_out_a_postgresql_restart(tmp_path, postgres_url):
    spec = tiny_study(tmp_path, bits=MENU)
    args = ["search", str(spec), "--budget", "3.5bpw", "--trials", str(TRIALS), "--workers", "0", "--storage", postgres_url, "--study", "restarted", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPSEARCH_DB_RETRY_S": "120"}
    driver, storage = started(args, env, postgres_url, "restarted", at_least=4)
    try:
        took = restart_postgresql()
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert took < 60
    assert driver.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert json.loads(out)["n_complete"] == TRIALS
    trials = optuna.load_study(study_name="restarted", storage=Storage(postgres_url).optuna()).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == TRIALS
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # Nothing written twice: each complete trial has its one plan and one loss, and the few
    # that were not evaluated (a trial row whose commit's answer was lost) are failed, not run.
    assert all(plan_of(t.user_attrs) is not None and len(t.values) == 1 for t in finished)
    assert len([t for t in trials if t.state == TrialState.FAIL]) <= 2


def test_a_database_gone_for_longer_than_the_window_stops_the_search_in_one_line(tmp_path, postgres_url):
    """PostgreSQL stopped for longer than $MPSEARCH_DB_RETRY_S: the search stops with one line that
    names the database and says to resume; once it is back, --resume ends with exactly N."""
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    spec = tiny_study(tmp_path, bits=MENU)
    args = ["search", str(spec), "--budget", "3.5bpw", "--trials", str(TRIALS), "--workers", "0", "--storage", postgres_url, "--study", "stopped", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPSEARCH_DB_RETRY_S": "4"}
    driver, storage = started(args, env, postgres_url, "stopped", at_least=3)
    try:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop"], check=True, capture_output=True, timeout=120)
        try:
            out, err = driver.communicate(timeout=300)
        finally:
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True, capture_output=True, timeout=120)
    finally:
        driver.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert driver.returncode == 2, err[-3000:]
    assert "Traceback" not in err and lines[-1].startswith("mpsearch: error: lost the database at 127.0.0.1:5432 for 4 s"), err[-3000:]
    assert "--resume" in lines[-1]
    for _ in range(60):  # the server takes a moment to accept connections again
        try:
            Storage(postgres_url)
            break
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    env["MPSEARCH_DB_RETRY_S"] = "120"
    resumed = subprocess.run([sys.executable, "-m", "mpsearch", *args, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["n_complete"] == TRIALS
