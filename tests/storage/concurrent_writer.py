"""One of the writers in test_four_processes_writing_at_once_lose_and_duplicate_nothing.

Usage: concurrent_writer.py STORAGE_URL INDEX. Creates a job, then interleaves 50 job-state
updates with 50 Optuna trials (ask, then tell) in the study "concurrency". Prints the job id.
"""

import sys

import optuna

from mpsearch.storage import Storage


def main(url: str, index: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = Storage(url)
    study = optuna.load_study(study_name="concurrency", storage=store.optuna())
    job = store.create_job("concurrency", "", {}, host=f"writer-{index}")
    for i in range(50):
        store.set_job_state(job, "running" if i % 2 == 0 else "queued", f"update {i}")
        trial = study.ask()
        trial.set_user_attr("writer", index)
        trial.set_user_attr("i", i)
        study.tell(trial, index + i / 100)
    print(job)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
