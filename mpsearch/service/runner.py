"""``mpsearch job-run JOB_ID``: what runs inside a submitted job.

It reads the job from the database (``$MPSEARCH_STORAGE``), marks it running, and runs the
whole search: the sensitivity profiles, the study (resumed if it exists, so a job that is
started again keeps every complete trial), and the export when one was asked for; or, for an
export job, the export of a trial of the study. The job
ends succeeded, failed (with the one-line reason) or, on SIGTERM (``jobs cancel``, Ray's
``stop_job``), cancelled; the trials completed until then stay in the study.

Inside a Ray job the search's actors go on the job's own cluster (``RAY_ADDRESS``, set by
Ray); elsewhere it starts a local Ray.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from mpsearch.errors import MPSearchError, first_line


class Cancelled(BaseException):
    """SIGTERM arrived: stop where we are (BaseException, so no ``except Exception`` swallows it)."""


def job_search(storage, job, spec_file: str | None = None):
    """The search a job runs: its spec (the submitted file, or the text in the job's row) with the
    job's overrides, on the spec's device, with the spec's GPUs per worker and trial timeout."""
    from mpsearch.search.driver import Search, driver_device
    from mpsearch.spec import Spec
    from mpsearch.workload import Workload

    args = job.spec.get("args", {})
    spec = Spec.load(spec_file) if spec_file else Spec.from_toml(job.spec_toml, base_dir=Path(job.spec["base_dir"]), origin=f"job {job.id}'s spec")
    if args.get("budget"):
        spec = spec.with_overrides(budget=args["budget"])
    address = "auto" if os.environ.get("RAY_ADDRESS") else None  # inside a Ray job: the job's own cluster
    workload = Workload(spec, device=driver_device(spec, args.get("workers")))
    return Search(
        workload, storage, study=job.study, trials=args.get("trials"), workers=args.get("workers"), time_limit_s=args.get("time_limit_s"), address=address, resume=True,
    )


def run_job(storage, job_id: str, spec_file: str | None = None) -> int:
    """Run job ``job_id`` to its end; the process exit code (0, 2 for bad input, 1 otherwise, 143 cancelled)."""
    from mpsearch.export import export_study

    job = storage.job(job_id)
    args = job.spec.get("args", {})
    if job.state == "cancelled":  # cancelled before this process got going
        return 143
    previous = signal.signal(signal.SIGTERM, _raise_cancelled)
    try:
        storage.set_job_state(job_id, "running", f"on {os.uname().nodename}, pid {os.getpid()}")
        if args.get("kind") == "export":
            exported = export_study(storage, job.study, Path(args["export_dir"]), trial=args.get("trial"), pareto_index=args.get("pareto_index"))
            summary = {k: v for k, v in exported.to_json().items() if k != "out"}
            storage.set_job_state(job_id, "succeeded", json.dumps(summary))
            print(json.dumps(summary), flush=True)
            return 0
        search = job_search(storage, job, spec_file)
        outcome = search.run()
        summary = {"n_complete": outcome.n_complete, "best": {k: v for k, v in (outcome.best or {}).items() if k != "plan"}}
        if args.get("export_dir"):
            exported = export_study(storage, job.study, Path(args["export_dir"]), force=True, device=search.workload.device)
            summary["export"] = {k: v for k, v in exported.to_json().items() if k != "out"}
        storage.set_job_state(job_id, "succeeded", json.dumps(summary))
        print(json.dumps(summary), flush=True)
        return 0
    except Cancelled:
        storage.set_job_state(job_id, "cancelled", "stopped by SIGTERM; complete trials are kept")
        return 143
    except MPSearchError as e:
        storage.set_job_state(job_id, "failed", str(e))
        print(f"mpsearch: error: {e}", flush=True)
        return 2
    except Exception as e:
        storage.set_job_state(job_id, "failed", f"{type(e).__name__}: {first_line(e)}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_cancelled(signum, frame) -> None:
    raise Cancelled()
