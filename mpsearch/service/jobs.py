"""Search jobs: a whole search (sensitivity, search, optional export) run away from the caller.

A job is a row in ``mpsearch_jobs`` (the spec as submitted, its arguments, its state and
history) plus the thing that runs it, one of:

* a **Ray job** on a cluster, submitted through Ray's Jobs API (``JobSubmissionClient``) at
  the head's dashboard address (``http://HEAD:8265``). Its ``runtime_env`` carries the
  spec's folder as the working directory and the storage URL as an environment variable;
  its entrypoint is ``python -m mpsearch job-run JOB_ID --spec FILE``. A cluster job must
  use a server database (PostgreSQL): every node writes to it.
* a **local process** (``python -m mpsearch job-run JOB_ID``, its own session), for the
  HTTP API on one machine: the search inside it starts a local Ray as usual.

The runner (:mod:`mpsearch.service.runner`) moves the job through running → succeeded /
failed / cancelled itself; :func:`sync` reconciles a job with what Ray (or the OS) says, for
a runner that died before it could. Ray's token (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token``) is sent by Ray's own client; mpsearch never reads or logs it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpsearch.errors import MPSearchError, first_line
from mpsearch.storage.lease import pid_alive

SUBMISSION_PREFIX = "mpsearch-"
LOCAL_PREFIX = "local:"
PASSED_ENV = ("MPSEARCH_CACHE_DIR", "MPSEARCH_MODEL_CACHE")  # the submitter's settings a cluster job keeps (shared cache folders)
RAY_TO_JOB = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "cancelled"}


ACTIVE_STATES = ("queued", "running")


@dataclass
class JobArgs:
    """What the runner passes on to ``mpsearch search`` (and ``export``): None keeps the spec's.

    ``kind="export"`` is an export of a finished study (the API's ``POST /studies/{name}/export``):
    ``trial`` / ``pareto_index`` pick the trial as ``mpsearch export`` does, ``export_dir`` is
    where it goes; it always runs as a local process, next to the folder it writes."""

    trials: int | None = None
    workers: int | None = None
    time_limit_s: float | None = None  # search --time-limit (default: the spec's search.time_limit_s)
    budget: str | None = None
    study: str | None = None
    export_dir: str | None = None
    kind: str = "search"
    trial: int | None = None
    pareto_index: int | None = None


def job_kind(job) -> str:
    """``search`` or ``export`` (jobs recorded before exports were jobs are searches)."""
    return job.spec.get("args", {}).get("kind", "search")


def active_jobs(storage, kind: str, limit: int = 1000) -> list:
    """The queued and running jobs of ``kind``, each reconciled with its process or Ray first
    (a job whose runner died is not counted)."""
    jobs = [job for job in storage.jobs(limit=limit) if job.state in ACTIVE_STATES and job_kind(job) == kind]
    return [job for job in (sync(storage, job.id) for job in jobs) if job.state in ACTIVE_STATES]


def check_idle(storage, study: str) -> None:
    """Refuse (:class:`StudyBusy`, a 409) a job for a study that a driver or another job is on.

    Two submissions at the same instant can both pass; the study lease then stops the second
    job's driver before it does any work."""
    from mpsearch.storage.lease import StudyBusy, busy_message, holder

    held = holder(storage, study)
    if held is not None:
        raise StudyBusy(busy_message(held))
    active = [job for job in storage.jobs(study=study) if job.state in ("queued", "running")]
    if active:
        raise StudyBusy(f"study {study!r} already has job {active[0].id} ({active[0].state}); wait for it to end or cancel it (mpsearch jobs cancel {active[0].id})")


def check_cluster_storage(url: str) -> None:
    if url.strip().lower().startswith("sqlite"):
        raise MPSearchError(
            f"a job on a cluster must use a server database, not SQLite ({url}); "
            "pass --storage postgresql+psycopg://USER@HOST:PORT/DB that every node can reach"
        )


@functools.lru_cache(maxsize=8)
def jobs_client(address: str):
    """A ``JobSubmissionClient`` for the head at ``address`` (``http://HEAD:8265``), reachable or a one-line error.

    Kept per address: listing many jobs asks one client, not one each (a failure is not kept).
    """
    from mpsearch.runtime import ray_client_env

    if not address.startswith(("http://", "https://")):
        raise MPSearchError(f"--address {address!r} is not the head's dashboard URL; give http://HEAD:8265")
    os.environ.update(ray_client_env())  # before Ray is imported: the client sends its token only in token mode
    _check_http(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise MPSearchError(f"cannot use the Ray Jobs API at {address} ({first_line(e)}); check the address and the cluster's token") from None


def submit(storage, spec, spec_toml: str, args: JobArgs, *, address: str | None = None, spec_file: Path | None = None, log_dir: Path | None = None) -> str:
    """Record a job for ``spec`` and start it on the cluster at ``address`` (or as a local process); its id."""
    from mpsearch.search.driver import default_study_name
    from mpsearch.storage.trials import check_study_name

    effective = spec.with_overrides(budget=args.budget) if args.budget else spec
    if args.trials is not None:  # validated as the spec's own search.trials is, before anything is recorded
        effective = effective.with_overrides(search={**effective.search.model_dump(), "trials": args.trials})
    study = check_study_name(args.study or default_study_name(effective))
    check_idle(storage, study)
    args = JobArgs(**{**asdict(args), "study": study})
    if address:
        check_cluster_storage(storage.url_string)
        client = jobs_client(address)
    meta = {"args": asdict(args), "base_dir": str(spec.base_dir), "address": address}
    job_id = storage.create_job(study, spec_toml, meta)
    try:
        if address:
            env_vars = {"MPSEARCH_STORAGE": storage.url_string, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            env_vars.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
            runtime_env: dict[str, Any] = {"env_vars": env_vars}
            entrypoint = f"python -m mpsearch job-run {job_id}"
            if spec_file is not None:
                runtime_env["working_dir"] = str(spec_file.parent)
                entrypoint += f" --spec {spec_file.name}"
            submission = client.submit_job(
                entrypoint=entrypoint, submission_id=f"{SUBMISSION_PREFIX}{job_id}", runtime_env=runtime_env, metadata={"mpsearch_job": job_id, "study": study}
            )
            storage.set_job_state(job_id, "queued", f"submitted to {address}", ray_job_id=submission)
        else:
            _start_local(storage, job_id, Path(spec.base_dir), log_dir)
    except MPSearchError as e:
        storage.set_job_state(job_id, "failed", str(e))
        raise
    except Exception as e:  # the Jobs API refused it: the record says why
        storage.set_job_state(job_id, "failed", f"submission failed: {first_line(e)}")
        raise MPSearchError(f"the cluster at {address} refused the job ({first_line(e)})") from None
    return job_id


def submit_export(storage, study: str, out: Path, *, trial: int | None = None, pareto_index: int | None = None, base_dir: Path, log_dir: Path | None = None) -> str:
    """Record an export job for a trial of ``study`` (the best by default) into ``out`` and start
    it as a local process here, where ``out`` is read from; its id."""
    args = JobArgs(study=study, export_dir=str(out), kind="export", trial=trial, pareto_index=pareto_index)
    job_id = storage.create_job(study, "", {"args": asdict(args), "base_dir": str(base_dir), "address": None})
    try:
        _start_local(storage, job_id, base_dir, log_dir)
    except Exception as e:
        storage.set_job_state(job_id, "failed", f"could not start: {first_line(e)}")
        raise MPSearchError(f"could not start the export job ({first_line(e)})") from None
    return job_id


def _start_local(storage, job_id: str, cwd: Path, log_dir: Path | None) -> None:
    """Run ``mpsearch job-run JOB_ID`` as a process of its own session, its output in ``log_dir``."""
    log = (log_dir or Path.cwd()) / f"job-{job_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MPSEARCH_STORAGE": storage.url_string}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mpsearch", "job-run", job_id], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(cwd)
        )
    storage.set_job_state(job_id, "queued", f"started as local process {process.pid}; log {log}", ray_job_id=f"{LOCAL_PREFIX}{process.pid}:{log}")


def result(storage, job) -> dict | None:
    """What a succeeded job recorded as its result (the search's summary, the export's files)."""
    if job.state != "succeeded":
        return None
    for event in reversed(storage.job_events(job.id)):
        if event.state == "succeeded" and event.message:
            try:
                doc = json.loads(event.message)
            except ValueError:
                return None
            return doc if isinstance(doc, dict) else None
    return None


def sync(storage, job_id: str):
    """The job, its state reconciled with Ray's (or the local process's) where the runner could not record it."""
    job = storage.job(job_id)
    if job.state in ("succeeded", "failed", "cancelled") or not job.ray_job_id:
        return job
    if job.ray_job_id.startswith(LOCAL_PREFIX):
        pid = int(job.ray_job_id[len(LOCAL_PREFIX):].split(":", 1)[0])
        if not _alive(pid):
            storage.set_job_state(job_id, "failed", f"the job's process {pid} ended without recording a result; see `mpsearch jobs logs {job_id}`")
        return storage.job(job_id)
    try:
        status = str(jobs_client(job.spec["address"]).get_job_status(job.ray_job_id).value)
    except MPSearchError:
        return job  # the cluster is out of reach: report what the database knows
    state = RAY_TO_JOB.get(status)
    if state and state != job.state and state != "queued":
        storage.set_job_state(job_id, state, f"Ray job {job.ray_job_id} is {status}")
    return storage.job(job_id)


def cancel(storage, job_id: str):
    """Stop a queued or running job; its complete trials stay in the study."""
    job = storage.job(job_id)
    if job.state in ("succeeded", "failed", "cancelled"):
        raise MPSearchError(f"job {job_id} is already {job.state}")
    if job.ray_job_id and job.ray_job_id.startswith(LOCAL_PREFIX):
        pid = int(job.ray_job_id[len(LOCAL_PREFIX):].split(":", 1)[0])
        if job.state == "queued":  # its runner may not handle SIGTERM yet: the record says cancelled first
            storage.set_job_state(job_id, "cancelled", "cancelled before it started")
        if _alive(pid):
            os.killpg(pid, signal.SIGTERM)  # a running runner records "cancelled" as it stops
    elif job.ray_job_id:
        jobs_client(job.spec["address"]).stop_job(job.ray_job_id)
    else:
        storage.set_job_state(job_id, "cancelled", "cancelled before it started")
    return storage.job(job_id)


def logs(storage, job_id: str) -> str:
    job = storage.job(job_id)
    if not job.ray_job_id:
        return ""
    if job.ray_job_id.startswith(LOCAL_PREFIX):
        path = Path(job.ray_job_id[len(LOCAL_PREFIX):].split(":", 1)[1])
        return path.read_text(errors="replace") if path.exists() else ""
    return jobs_client(job.spec["address"]).get_job_logs(job.ray_job_id)


def _alive(pid: int) -> bool:
    try:  # our own child (the API's local jobs): reap it if it has ended
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    return pid_alive(pid)


def _check_http(address: str, timeout_s: float = 5.0) -> None:
    from urllib.parse import urlparse

    from mpsearch.runtime import probe

    url = urlparse(address)
    problem = probe(url.hostname or "", url.port or (443 if url.scheme == "https" else 80), timeout_s)
    if problem:
        raise MPSearchError(f"nothing answers at {address} ({problem}); start the cluster (`ray start --head`) or check --address")
