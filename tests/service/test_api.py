"""The HTTP API as a real server process on a loopback port, driven over HTTP, on PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, fresh_postgres, tiny_spec_text, wait_for_port

TOKEN = "t0ken-for-the-api-tests-" + "x" * 16

SPEC = tiny_spec_text((3, 8)) + "[search]\nworkers = 0\n"


class Server:
    def __init__(self, url: str, root: Path, storage: str):
        self.url, self.root, self.storage = url, root, storage

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


def start_server(root: Path, storage: str, *extra: str):
    port = free_port()
    env = {**os.environ, "MPSEARCH_API_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    log = (root / f"server-{port}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mpsearch", "serve", "--port", str(port), "--storage", storage, "--root", str(root),
         "--export-root", str(root / "exports"), *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
    )
    wait_for_port(port, lambda: process.poll() is None, timeout_s=120)
    return process, Server(f"http://127.0.0.1:{port}", root, storage)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    with fresh_postgres() as storage:
        process, server = start_server(root, storage)
        try:
            yield server
        finally:
            process.terminate()
            process.wait(timeout=60)


def wait_job(client: httpx.Client, job_id: str, states: set[str], timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(1)


def test_every_endpoint_but_health_needs_the_token(server):
    assert server.client(None).get("/health").json() == {"status": "ok"}
    for client in (server.client(None), server.client("wrong-token-of-enough-length")):
        for method, path in (("GET", "/jobs"), ("GET", "/studies"), ("POST", "/jobs"), ("GET", "/exports/1/files/plan.json"), ("POST", "/jobs/x/cancel"), ("GET", "/studies/x/report")):
            response = client.request(method, path, json={})
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", (method, path)
    assert server.client().get("/studies").status_code == 200


def test_submit_poll_read_export_and_download(server):
    api = server.client()
    response = api.post("/jobs", json={"spec": SPEC, "trials": 4, "time_limit_s": 3600.0, "budget": "5.0bpw", "study": "api-study", "export": True})
    assert response.status_code == 201, response.text
    assert api.post("/jobs", json={"spec": SPEC, "time_limit_s": 0}).status_code == 422
    job = response.json()
    assert job["state"] in ("queued", "running") and job["study"] == "api-study"
    done = wait_job(api, job["id"], {"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded", (done, api.get(f"/jobs/{job['id']}/logs").text[-3000:])
    assert any(j["id"] == job["id"] for j in api.get("/jobs").json())
    # The job's JSON shows no local process id or log path; the log lives under the export root.
    assert done["ray_job_id"] is None and str(server.root) not in api.get(f"/jobs/{job['id']}").text
    assert (server.root / "exports" / "job-logs" / f"job-{job['id']}.log").is_file()
    assert '"n_complete": 4' in api.get(f"/jobs/{job['id']}/logs").text

    assert "api-study" in [s["name"] for s in api.get("/studies").json()]
    trials = api.get("/studies/api-study/trials").json()
    assert sum(t["state"] == "COMPLETE" for t in trials) == 4
    best = api.get("/studies/api-study/best").json()
    assert best["best"]["loss"] == min(t["loss"] for t in trials if t["state"] == "COMPLETE") and best["best"]["bytes"] <= best["budget_bytes"]
    assert api.get("/studies/api-study/pareto").status_code == 400  # one objective: no front
    assert api.get("/studies/nope/trials").status_code == 404

    # The report page, as `mpsearch report` writes it: every figure embedded, no server path.
    page = api.get("/studies/api-study/report", params={"top": 3})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:300]
    for stem in ("loss_by_trial", "loss_by_size", "best_plan", "top_k_bits"):
        assert f'<img id="{stem}" src="data:image/png;base64,' in page.text
    assert "top 3 plans" in page.text and str(server.root) not in page.text
    missing = api.get("/studies/nope/report")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]

    # The search job's own export is listed with download URLs, not the server's folder.
    assert [f["name"] for f in done["result"]["export"]["files"]] and "out" not in done["result"]["export"]

    # An export is a job of its own: 202 at once, then its files in the job's result.
    response = api.post("/studies/api-study/export", json={})
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "export" and response.json()["state"] in ("queued", "running")
    exported = wait_job(api, response.json()["id"], {"succeeded", "failed", "cancelled"})
    assert exported["state"] == "succeeded", (exported, api.get(f"/jobs/{exported['id']}/logs").text[-3000:])
    export = exported["result"]
    assert export["trial"] == best["best"]["trial"] and str(server.root) not in json.dumps(exported)
    files = {f["name"]: f for f in export["files"]}
    model = api.get(files["model.safetensors"]["url"])
    assert model.status_code == 200 and hashlib.sha256(model.content).hexdigest() == files["model.safetensors"]["sha256"]
    assert api.get(files["plan.json"]["url"]).json()["provenance"]["trial"] == export["trial"]

    # Only the export's own files, never a path out of it.
    base = f"/exports/{export['export_id']}/files"
    for path in ("..%2Fserver.log", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "nope.txt"):
        response = api.get(f"{base}/{path}")
        assert response.status_code in (400, 404) and b"root:" not in response.content, path
    assert api.get("/exports/9999/files/plan.json").status_code == 404


def test_the_server_rules_refuse_code_paths_outside_its_root_and_big_bodies(server):
    api = server.client()
    before = len(api.get("/jobs").json())
    for spec, field in (
        ('[model]\nsource = "python:os:getcwd"\n', "model.source"),
        ('[loss]\nkind = "callable"\ncallable = "os:getcwd"\n', "loss.kind"),
    ):
        response = api.post("/jobs", json={"spec": spec})
        assert response.status_code == 403 and field in response.json()["detail"] and "--allow-python" in response.json()["detail"]
    for spec in ('[model]\nsource = "hf:/etc"\n', '[model]\nsource = "hf:../.."\n', '[data]\nsource = "/etc/passwd"\n'):
        response = api.post("/jobs", json={"spec": spec})
        assert response.status_code == 403 and "outside this server's root" in response.json()["detail"], spec
    response = api.post("/jobs", json={"spec": "x = " + "[" * 50_000 + "]" * 50_000})
    assert response.status_code == 400 and "too deeply" in response.json()["detail"]
    response = api.post("/jobs", json={"spec": "[quant]\nbits = [5]\n"})
    assert response.status_code == 400 and response.json()["detail"].startswith("quant.bits:")
    response = api.post("/jobs", content=b'{"spec": "' + b"#" * (2 << 20) + b'"}', headers={"content-type": "application/json"})
    assert response.status_code == 413

    def chunks():  # no Content-Length: the limit is found as the body streams in
        yield b'{"spec": "'
        for _ in range(40):
            yield b"#" * 65536
        yield b'"}'

    response = api.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "detail" in response.json()
    # Validation errors are one line too, and junk ids are simply not found.
    response = api.post("/jobs", json={"spec": SPEC, "trials": 0})
    assert response.status_code == 422 and response.json()["detail"].startswith("body.trials: ") and "\n" not in response.json()["detail"]
    assert api.get("/jobs/%00").status_code == 404 and api.get("/jobs/" + "x" * 60).status_code == 404
    # The schema is behind the token too.
    assert server.client(None).get("/openapi.json").status_code == 401 and api.get("/openapi.json").status_code == 200
    assert server.client(None).get("/docs").status_code in (401, 404)
    assert len(api.get("/jobs").json()) == before  # nothing was submitted


def test_a_job_cancelled_over_the_api_ends_cancelled_and_keeps_its_trials(server):
    api = server.client()
    job = api.post("/jobs", json={"spec": SPEC, "trials": 500, "budget": "5.0bpw", "study": "api-cancel"}).json()
    again = api.post("/jobs", json={"spec": SPEC, "trials": 500, "budget": "5.0bpw", "study": "api-cancel"})  # one job per study
    assert again.status_code == 409 and f"already has job {job['id']}" in again.json()["detail"], again.text
    deadline = time.monotonic() + 600
    while True:
        trials = api.get("/studies/api-cancel/trials")
        complete = [t for t in trials.json() if t["state"] == "COMPLETE"] if trials.status_code == 200 else []
        if len(complete) >= 3:
            break
        if len(complete) >= 1:  # its driver holds the study's lease: refused by that too
            detail = api.post("/jobs", json={"spec": SPEC, "study": "api-cancel"}).json()["detail"]
            assert "is being searched by another driver" in detail or "already has job" in detail
        assert time.monotonic() < deadline and api.get(f"/jobs/{job['id']}").json()["state"] in ("queued", "running")
        time.sleep(1)
    assert api.post(f"/jobs/{job['id']}/cancel").status_code == 202
    done = wait_job(api, job["id"], {"succeeded", "failed", "cancelled"}, timeout_s=120)
    assert done["state"] == "cancelled", done
    states = [t["state"] for t in api.get("/studies/api-cancel/trials").json()]
    assert "RUNNING" not in states  # the trial in flight (scored in the job's own process) was failed, not left running
    after = {t["number"]: t["loss"] for t in api.get("/studies/api-cancel/trials").json() if t["state"] == "COMPLETE"}
    assert all(after[t["number"]] == t["loss"] for t in complete) and len(after) < 500
    assert api.post(f"/jobs/{job['id']}/cancel").status_code == 400  # already over


def test_the_server_does_not_start_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MPSEARCH_API_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "mpsearch", "serve", "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "no API token" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    short = tmp_path / "token"
    short.write_text("abc\n")
    out = subprocess.run([sys.executable, "-m", "mpsearch", "serve", "--token-file", str(short)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "at least 16" in out.stderr


def test_schema_fuzzing_finds_no_server_error(tmp_path):
    """schemathesis over every operation of the OpenAPI schema, a bounded number of examples each.

    This server sends jobs to a Ray address where nothing listens, so a generated spec that
    happens to be valid is refused (400) instead of starting a real search.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    with fresh_postgres() as storage:
        process, server = start_server(tmp_path, storage, "--ray-address", "http://127.0.0.1:9")
        try:
            schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
            operations = [result.ok() for result in schema.get_all_operations()]
            assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
                "POST /jobs", "GET /jobs", "GET /jobs/{job_id}", "POST /jobs/{job_id}/cancel", "GET /studies",
                "GET /studies/{name}/trials", "GET /studies/{name}/best", "GET /studies/{name}/pareto",
                "POST /studies/{name}/export", "GET /exports/{export_id}/files/{file}", "GET /jobs/{job_id}/logs",
                "GET /studies/{name}/report",
            }
            failures, calls = [], []
            for operation in operations:

                @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
                @given(case=operation.as_strategy())
                def call(case):
                    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"})
                    calls.append(response.status_code)
                    if response.status_code >= 500:
                        failures.append((operation.label, case.path, case.body, response.status_code, response.text[:300]))

                call()
            assert not failures, failures[:3]
            assert len(calls) >= 100 and any(c == 400 for c in calls)  # it really sent requests, bad ones among them
        finally:
            process.terminate()
            process.wait(timeout=60)


def test_an_export_over_the_api_runs_no_code_the_server_refuses(server, tmp_path):
    """A study whose spec builds its model with python: (written to the shared database by a CLI
    search) is not exported by a server started without --allow-python: its module never runs."""
    import torch
    from safetensors.torch import save_file

    from conftest import FACTORIES

    marker = tmp_path / "imported"
    (tmp_path / "marked.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n" + FACTORIES)
    save_file({"inputs": torch.randn(32, 64)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "study.toml").write_text(
        '[model]\nsource = "python:marked:mlp"\n[data]\nsource = "x.safetensors"\ncalibration = 8\nevaluation = 8\n'
        '[quant]\nmethod = "rtn"\ngroup_size = 32\nbits = [3, 8]\n'
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "mpsearch", "search", "study.toml", "--workers", "0", "--trials", "2", "--budget", "5.0bpw",
                          "--storage", server.storage, "--study", "python-model"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    marker.unlink()
    response = server.client().post("/studies/python-model/export", json={})
    assert response.status_code == 403 and "--allow-python" in response.json()["detail"], response.text
    assert not marker.exists()
    # The API bounds trials as the spec does.
    response = server.client().post("/jobs", json={"spec": SPEC, "trials": 10**9})
    assert response.status_code == 422

    # The same study exported by its owner on the CLI: loading it back without a model would run
    # the module plan.json names, so load_quantized needs trust_code=True for that.
    from mpsearch.export import ExportError, load_quantized

    out = subprocess.run([sys.executable, "-m", "mpsearch", "export", "python-model", "--storage", server.storage, "--out", str(tmp_path / "export")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    marker.unlink()
    with pytest.raises(ExportError, match="trust_code=True"):
        load_quantized(tmp_path / "export")
    assert not marker.exists()
    model = load_quantized(tmp_path / "export", trust_code=True)
    assert marker.exists() and sum(1 for _ in model.modules()) > 1


def test_a_job_cancelled_right_after_it_was_submitted_is_cancelled(server):
    api = server.client()
    job = api.post("/jobs", json={"spec": SPEC, "trials": 50, "budget": "5.0bpw", "study": "api-cancel-at-once"}).json()
    assert api.post(f"/jobs/{job['id']}/cancel").status_code == 202
    done = wait_job(api, job["id"], {"succeeded", "failed", "cancelled"}, timeout_s=120)
    assert done["state"] == "cancelled", done
    time.sleep(3)  # whatever its process was doing, the record stays cancelled
    assert api.get(f"/jobs/{job['id']}").json()["state"] == "cancelled"


def test_the_server_limits_jobs_and_exports_running_at_once(tmp_path):
    """--max-jobs 1 --max-exports 1: a second search job or a second export while one is queued
    or running gets 429 with Retry-After; once it ends, the next one is taken."""
    with fresh_postgres() as storage:
        process, server = start_server(tmp_path, storage, "--max-jobs", "1", "--max-exports", "1")
        try:
            api = server.client()
            first = api.post("/jobs", json={"spec": SPEC, "trials": 2, "budget": "5.0bpw", "study": "limit-a"})
            assert first.status_code == 201, first.text
            second = api.post("/jobs", json={"spec": SPEC, "trials": 4, "budget": "5.0bpw", "study": "limit-b"})
            assert second.status_code == 429 and second.headers["retry-after"] and "1 search job(s)" in second.json()["detail"], second.text
            done = wait_job(api, first.json()["id"], {"succeeded", "failed", "cancelled"})
            assert done["state"] == "succeeded", (done, api.get(f"/jobs/{done['id']}/logs").text[-3000:])

            assert api.post("/studies/nope/export", json={}).status_code == 404
            export = api.post("/studies/limit-a/export", json={})
            assert export.status_code == 202, export.text
            again = api.post("/studies/limit-a/export", json={})
            assert again.status_code == 429 and "1 export job(s)" in again.json()["detail"], again.text
            exported = wait_job(api, export.json()["id"], {"succeeded", "failed", "cancelled"})
            assert exported["state"] == "succeeded", (exported, api.get(f"/jobs/{exported['id']}/logs").text[-3000:])
            assert api.get(exported["result"]["files"][0]["url"]).status_code == 200
            last = api.post("/studies/limit-a/export", json={"trial": exported["result"]["trial"]})  # room again
            assert last.status_code == 202, last.text
            assert wait_job(api, last.json()["id"], {"succeeded", "failed", "cancelled"})["state"] == "succeeded"
        finally:
            process.terminate()
            process.wait(timeout=60)
