"""`mpsearch submit` / `jobs`: whole searches as Ray jobs on a real single-node cluster, on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mpsearch.storage import Storage

from conftest import fresh_postgres, tiny_study


@pytest.fixture(scope="module")
def shared_pg():
    """One database for the jobs that run searches: the sensitivity profiles of the tiny
    spec are computed by the first and read back by the others, as they would be in use."""
    with fresh_postgres() as url:
        yield url


def mpsearch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mpsearch", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def job_state(job_id: str, storage: str) -> dict:
    out = mpsearch("jobs", "--storage", storage, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    return next(j for j in json.loads(out.stdout)["jobs"] if j["id"] == job_id)


def wait_for(job_id: str, storage: str, states: set[str], timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = job_state(job_id, storage)
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(2)


def complete_trials(storage: str, study: str) -> dict[int, float]:
    if study not in optuna.get_all_study_names(Storage(storage).optuna()):
        return {}
    trials = optuna.load_study(study_name=study, storage=Storage(storage).optuna()).get_trials(deepcopy=False)
    return {t.number: t.values[0] for t in trials if t.state == TrialState.COMPLETE}


def test_a_submitted_search_succeeds_keeps_its_trials_and_exports(ray_cluster, shared_pg, tmp_path):
    postgres_url = shared_pg
    spec = tiny_study(tmp_path, bits=(3, 8))
    out_dir = tmp_path / "export"
    out = mpsearch("submit", spec, "--address", ray_cluster.dashboard, "--storage", postgres_url, "--workers", "1", "--trials", "5",
                   "--budget", "5.0bpw", "--export", out_dir, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    job = json.loads(out.stdout)
    assert job["ray_job_id"] == f"mpsearch-{job['id']}" and job["study"] == "study-5bpw"
    done = wait_for(job["id"], postgres_url, {"succeeded", "failed", "cancelled"})
    logs = mpsearch("jobs", "logs", job["id"], "--storage", postgres_url).stdout  # --storage on either side
    assert done["state"] == "succeeded", (done, logs[-3000:])
    assert '"n_complete": 5' in logs

    listed = mpsearch("trials", job["study"], "--storage", postgres_url, "--json")
    rows = json.loads(listed.stdout)["trials"]
    assert sum(r["state"] == "COMPLETE" for r in rows) == 5
    assert {r["worker"] for r in rows if r["state"] == "COMPLETE"} != {None}  # scored by the cluster's actor

    assert (out_dir / "model.safetensors").is_file() and (out_dir / "plan.json").is_file()
    (record,) = Storage(postgres_url).exports(job["study"])
    assert record.out_dir == str(out_dir) and len(record.files) == 6

    # Its history went queued → running → succeeded, in the database.
    events = [e.state for e in Storage(postgres_url).job_events(job["id"])]
    assert events[0] == "queued" and events[-1] == "succeeded" and "running" in events

    # The cluster runs with token auth (Ray 2.60's default); the token shows up nowhere.
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    listing = mpsearch("jobs", "--storage", postgres_url)
    assert len(token) >= 16 and all(token not in text for text in (out.stdout, out.stderr, logs, listing.stdout, listing.stderr))


def test_a_job_cancelled_while_running_ends_cancelled_and_keeps_its_trials(ray_cluster, shared_pg, tmp_path):
    postgres_url = shared_pg
    spec = tiny_study(tmp_path, bits=(3, 8))
    out = mpsearch("submit", spec, "--address", ray_cluster.dashboard, "--storage", postgres_url, "--workers", "1", "--trials", "500",
                   "--budget", "5.0bpw", "--study", "cancelled", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    job = json.loads(out.stdout)
    deadline = time.monotonic() + 600
    while len(complete_trials(postgres_url, job["study"])) < 3:
        assert time.monotonic() < deadline and job_state(job["id"], postgres_url)["state"] in ("queued", "running")
        time.sleep(1)
    cancelled = mpsearch("jobs", "--storage", postgres_url, "cancel", job["id"])
    assert cancelled.returncode == 0, cancelled.stderr
    seen = complete_trials(postgres_url, job["study"])
    done = wait_for(job["id"], postgres_url, {"succeeded", "failed", "cancelled"}, timeout_s=120)
    assert done["state"] == "cancelled", done
    after = complete_trials(postgres_url, job["study"])
    assert len(after) < 500 and all(after[n] == loss for n, loss in seen.items())  # nothing complete was lost


def test_a_cluster_job_refuses_sqlite_and_an_unreachable_head(tmp_path, postgres_url):
    spec = tiny_study(tmp_path, bits=(3, 8))  # its storage is a SQLite file
    out = mpsearch("submit", spec, "--address", "http://127.0.0.1:8265")
    assert out.returncode == 2 and "must use a server database, not SQLite" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = mpsearch("submit", spec, "--address", "http://127.0.0.1:9", "--storage", postgres_url)
    assert out.returncode == 2 and "nothing answers at http://127.0.0.1:9" in out.stderr, out.stderr
    out = mpsearch("submit", spec, "--address", "127.0.0.1:6379", "--storage", postgres_url)
    assert out.returncode == 2 and "dashboard URL" in out.stderr
    assert Storage(postgres_url).jobs() == []  # nothing was recorded for a job that never went in


def test_the_api_submits_to_the_cluster_with_the_spec_from_the_database(ray_cluster, shared_pg, tmp_path):
    """POST /jobs with --ray-address: the Ray job has no working directory; it reads its spec from the job's row."""
    import httpx

    from test_api import SPEC, TOKEN, start_server

    postgres_url = shared_pg
    process, server = start_server(tmp_path, postgres_url, "--ray-address", ray_cluster.dashboard)
    try:
        api = server.client()
        response = api.post("/jobs", json={"spec": SPEC, "trials": 3, "workers": 1, "budget": "5.0bpw", "study": "api-on-ray"})
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["ray_job_id"] == f"mpsearch-{job['id']}"
        deadline = time.monotonic() + 600
        while (state := api.get(f"/jobs/{job['id']}").json()["state"]) not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline
            time.sleep(2)
        assert state == "succeeded", mpsearch("jobs", "--storage", postgres_url, "logs", job["id"]).stdout[-3000:]
        assert sum(t["state"] == "COMPLETE" for t in api.get("/studies/api-on-ray/trials").json()) == 3
        assert httpx.get(f"{server.url}/jobs", headers={"Authorization": "Bearer " + "x" * len(TOKEN)}).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=60)
