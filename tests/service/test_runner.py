"""What runs inside a job (`mpsearch job-run`): the search the spec asks for, with the spec's own settings."""

from __future__ import annotations

from mpsearch.service.runner import run_job
from mpsearch.storage import Storage

from conftest import tiny_spec_text


def job(storage: Storage, spec_text: str, tmp_path, **args) -> str:
    return storage.create_job("tiny-3bpw", spec_text, {"args": {"trials": 6, **args}, "base_dir": str(tmp_path), "address": None})


def test_a_job_runs_on_the_device_its_spec_names(tmp_path):
    """The runner used to build the workload on the CPU whatever the spec said. On a machine
    without CUDA, a spec that asks for it now fails the job in one line instead."""
    storage = Storage(f"sqlite:///{tmp_path / 'jobs.db'}")
    text = tiny_spec_text() + '[search]\ndevice = "cuda:0"\nworkers = 0\n'
    job_id = job(storage, text, tmp_path)
    assert run_job(storage, job_id) == 2
    failed = storage.job(job_id)
    assert failed.state == "failed" and "device 'cuda:0' is not available" in failed.error


def test_a_job_searches_with_the_settings_of_its_spec(tmp_path):
    """The runner used to drop the spec's trial timeout (for the default 600 s) and device."""
    from mpsearch.service.runner import job_search

    storage = Storage(f"sqlite:///{tmp_path / 'jobs.db'}")
    text = tiny_spec_text() + '[search]\ntrial_timeout_s = 7.5\ndevice = "cpu"\ngpus_per_worker = 0.5\nworkers = 3\n'
    job_id = job(storage, text, tmp_path, workers=None, budget="3.5bpw")
    search = job_search(storage, storage.job(job_id))
    assert search.trial_timeout_s == 7.5 and str(search.workload.device) == "cpu" and search.workers == 3
    assert search.spec.search.gpus_per_worker == 0.5 and search.spec.budget.bpw == 3.5 and search.trials == 6


def test_a_job_keeps_the_time_limit_it_was_submitted_with(tmp_path):
    """`submit --time-limit` and the API's `time_limit_s` reach the job's search; without one the
    spec's own search.time_limit_s holds."""
    from mpsearch.service.runner import job_search

    storage = Storage(f"sqlite:///{tmp_path / 'jobs.db'}")
    text = tiny_spec_text() + "[search]\ntime_limit_s = 120.0\nworkers = 0\n"
    limited = job_search(storage, storage.job(job(storage, text, tmp_path, time_limit_s=7.5)))
    assert limited.time_limit_s == 7.5
    assert job_search(storage, storage.job(job(storage, text, tmp_path))).time_limit_s == 120.0
