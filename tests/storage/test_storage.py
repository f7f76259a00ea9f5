"""The storage layer on real databases: a SQLite file and a PostgreSQL database per test."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from mpsearch.errors import MPSearchError, StorageError
from mpsearch.storage import ProfileKey, Storage, parse_url
from mpsearch.storage import schema
from mpsearch.storage.database import create_engine
from mpsearch.storage.models import Base

HERE = Path(__file__).resolve().parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


def tables(url: str) -> set[str]:
    engine = create_engine(parse_url(url))
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_a_fresh_database_gets_both_schemas_side_by_side(storage_url):
    store = Storage(storage_url)
    store.optuna()
    assert store.revision == schema.head() == "0004"
    names = tables(storage_url)
    assert {"mpsearch_jobs", "mpsearch_job_events", "mpsearch_sensitivity_profiles", "mpsearch_exports", "mpsearch_export_files"} <= names
    assert {"studies", "trials", "trial_values", "alembic_version"} <= names  # Optuna's, untouched
    assert "mpsearch_alembic_version" in names  # our history apart from Optuna's
    store.close()


def test_the_migrations_build_exactly_the_models(storage_url):
    """Alembic's autogenerate finds nothing to change between the migrated tables and the models."""
    store = Storage(storage_url)
    with store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"include_name": lambda name, kind, _parent: kind != "table" or name.startswith("mpsearch_") and name != schema.VERSION_TABLE},
        )
        assert compare_metadata(context, Base.metadata) == []
    store.close()


def test_a_database_at_the_first_revision_is_refused_then_upgraded_with_its_data(storage_url):
    engine = create_engine(parse_url(storage_url))
    assert schema.upgrade(engine, "0001") == (None, "0001")
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO mpsearch_jobs (id, study, spec_toml, spec, state, created_at, updated_at) "
                "VALUES ('oldjob', 'minilm', 'name = \"minilm\"', '{}', 'succeeded', :now, :now)"
            ),
            {"now": "2026-01-01 00:00:00"},
        )
    engine.dispose()

    with pytest.raises(StorageError, match=r"has mpsearch schema 0001, this mpsearch needs 0004; run `mpsearch db upgrade --storage "):
        Storage(storage_url)

    out = subprocess.run([sys.executable, "-m", "mpsearch", "db", "upgrade", "--storage", storage_url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mpsearch schema 0001 -> 0004" in out.stdout
    assert "INFO" not in out.stderr

    store = Storage(storage_url)
    assert store.job("oldjob").study == "minilm" and store.job("oldjob").state == "succeeded"
    key = ProfileKey("hessian", "m", "d", "s", {"probes": 8})
    store.save_profile(key, {"layers": {}})  # the tables 0002 added work
    assert store.find_profile(key) is not None
    from mpsearch.storage.lease import Lease

    with Lease(store, "minilm"):  # and the one 0003 added
        pass
    losses = {"loss": 0.02, "test_loss": 0.021, "verified_loss": 0.02, "repair": {"loss_before": 0.02, "loss_after": 0.018}}
    export_id = store.record_export("minilm", 3, {"format_version": 1, "layers": {}}, 10, 4.0, "/nowhere", [], losses)
    assert store.export(export_id).losses == losses  # and the column 0004 added
    again = subprocess.run([sys.executable, "-m", "mpsearch", "db", "upgrade", "--storage", storage_url], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already at mpsearch schema 0004" in again.stdout
    store.close()


def test_a_database_from_a_newer_mpsearch_is_refused(storage_url):
    Storage(storage_url).close()
    engine = create_engine(parse_url(storage_url))
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(StorageError, match=r"has mpsearch schema 0099, newer than this mpsearch knows \(its newest is 0004\); upgrade mpsearch"):
        Storage(storage_url)
    out = subprocess.run([sys.executable, "-m", "mpsearch", "db", "upgrade", "--storage", storage_url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "newer than this mpsearch knows" in out.stderr


def test_jobs_move_through_their_states_and_keep_their_history(storage_url):
    store = Storage(storage_url)
    job = store.create_job("minilm", 'name = "minilm"', {"name": "minilm"})
    assert store.job(job).state == "queued"
    store.set_job_state(job, "running", ray_job_id="raysubmit_123")
    with pytest.raises(MPSearchError, match="job state 'bogus' is not one of queued, running, succeeded, failed, cancelled"):
        store.set_job_state(job, "bogus")
    store.set_job_state(job, "failed", "worker died: out of memory")
    with pytest.raises(MPSearchError, match=f"job {job} is failed and cannot become succeeded"):
        store.set_job_state(job, "succeeded")
    row = store.job(job)
    assert row.state == "failed" and row.error == "worker died: out of memory" and row.ray_job_id == "raysubmit_123"
    assert row.started_at is not None and row.finished_at is not None
    assert [e.state for e in store.job_events(job)] == ["queued", "running", "failed"]
    assert [j.id for j in store.jobs(study="minilm")] == [job]
    with pytest.raises(MPSearchError, match="no job 'nope'"):
        store.set_job_state("nope", "running")
    store.close()


def test_a_profile_is_reused_only_when_every_key_matches(storage_url):
    store = Storage(storage_url)
    key = ProfileKey("hessian", "model-a", "data-a", "scheme-a", {"probes": 16, "seed": 0})
    store.save_profile(key, {"layers": {"fc": {"trace": 1.5}}}, study="minilm", seconds=3.0)
    found = store.find_profile(ProfileKey("hessian", "model-a", "data-a", "scheme-a", {"seed": 0, "probes": 16}))
    assert found is not None and found.values == {"layers": {"fc": {"trace": 1.5}}}
    for changed in (
        ProfileKey("perturbation", "model-a", "data-a", "scheme-a", {"probes": 16, "seed": 0}),
        ProfileKey("hessian", "model-b", "data-a", "scheme-a", {"probes": 16, "seed": 0}),
        ProfileKey("hessian", "model-a", "data-b", "scheme-a", {"probes": 16, "seed": 0}),
        ProfileKey("hessian", "model-a", "data-a", "scheme-b", {"probes": 16, "seed": 0}),
        ProfileKey("hessian", "model-a", "data-a", "scheme-a", {"probes": 32, "seed": 0}),
    ):
        assert store.find_profile(changed) is None
    store.save_profile(key, {"layers": {"fc": {"trace": 2.0}}})  # recomputed: replaces, never duplicates
    with store.session() as s:
        assert s.scalar(sa.text("SELECT count(*) FROM mpsearch_sensitivity_profiles")) == 1
    assert store.find_profile(key).values["layers"]["fc"]["trace"] == 2.0
    store.close()


def test_an_export_is_recorded_with_a_checksum_per_file(storage_url):
    store = Storage(storage_url)
    files = [("plan.json", 812, "a" * 64), ("model.safetensors", 53_177_000, "b" * 64)]
    export_id = store.record_export("minilm", 17, {"fc": 4}, 53_177_812, 3.99, "/tmp/out", files)
    (row,) = store.exports("minilm")
    assert row.id == export_id and row.trial == 17 and row.plan == {"fc": 4} and row.bytes == 53_177_812
    assert sorted((f.path, f.size, f.sha256) for f in row.files) == sorted(files)
    store.close()


def test_optunas_own_cli_reads_a_study_mpsearch_wrote(storage_url):
    store = Storage(storage_url)
    study = optuna.create_study(study_name="minilm-4bpw", storage=store.optuna())
    for i in range(3):
        trial = study.ask()
        trial.set_user_attr("bytes", 53_000_000 + i)
        study.tell(trial, 0.1 * (i + 1))
    store.close()
    optuna_cli = Path(sys.executable).with_name("optuna")
    out = subprocess.run([str(optuna_cli), "studies", "--storage", storage_url, "-f", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    (row,) = json.loads(out.stdout)
    assert row["name"] == "minilm-4bpw" and row["n_trials"] == 3


def test_four_processes_writing_at_once_lose_and_duplicate_nothing(storage_url):
    store = Storage(storage_url)
    optuna.create_study(study_name="concurrency", storage=store.optuna())
    store.close()
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "concurrent_writer.py"), storage_url, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    job_ids = [stdout.strip() for stdout, _ in outputs]

    store = Storage(storage_url)
    for job in job_ids:
        events = store.job_events(job)
        assert len(events) == 1 + 50  # created, then 50 updates
        assert [e.message for e in events[1:]] == [f"update {i}" for i in range(50)]
        assert store.job(job).state == "queued"
    trials = optuna.load_study(study_name="concurrency", storage=store.optuna()).get_trials()
    assert len(trials) == 200
    assert sorted(t.number for t in trials) == list(range(200))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert sorted((t.user_attrs["writer"], t.user_attrs["i"]) for t in trials) == [(w, i) for w in range(4) for i in range(50)]
    store.close()


def test_malformed_and_unsupported_urls_get_one_line_errors(tmp_path):
    for url, message in (
        ("not a url", "storage URL 'not a url' is malformed"),
        ("mysql://u@h/db", "uses 'mysql', which mpsearch does not support"),
        ("postgresql+psycopg2://u@h/db", "asks for driver 'postgresql+psycopg2'; mpsearch uses postgresql+psycopg"),
        ("postgresql://u@h", "names no database"),
        ("sqlite://", "is not a file"),
        (f"sqlite:///{tmp_path}/missing/x.db", "folder"),
    ):
        with pytest.raises(StorageError, match=re.escape(message)):
            Storage(url)


def test_connection_failures_are_retried_then_reported(password_refusing_server):
    import time

    t = time.perf_counter()
    with pytest.raises(StorageError, match=r"cannot reach the database at 127.0.0.1:1 after 3 tries .*Connection refused.*; start the server or fix the storage URL"):
        Storage("postgresql://postgres@127.0.0.1:1/test")
    assert time.perf_counter() - t >= 1.5  # it did wait and retry: 0.5 s then 1 s
    t = time.perf_counter()
    with pytest.raises(StorageError, match=r"cannot log in to PostgreSQL at 127.0.0.1:\d+ as 'alice' .*password authentication failed"):
        Storage(f"postgresql://alice:wrong@127.0.0.1:{password_refusing_server}/test")
    assert time.perf_counter() - t < 1.5  # a refused password is not retried


def test_a_command_that_only_reads_creates_nothing(tmp_path):
    """`mpsearch studies` on an empty file, a text file or a missing file: one line, exit 2, the file untouched."""
    empty = tmp_path / "empty.db"
    empty.touch()
    text = tmp_path / "notes.db"
    text.write_text("my notes")
    for path, message in ((empty, "is empty"), (text, "is not a SQLite database"), (tmp_path / "missing.db", "there is no database file")):
        with pytest.raises(StorageError, match=message):
            Storage(f"sqlite:///{path}", create=False)
        out = subprocess.run([sys.executable, "-m", "mpsearch", "studies", "--storage", f"sqlite:///{path}"], capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert empty.stat().st_size == 0 and text.read_text() == "my notes" and not (tmp_path / "missing.db").exists()
    # A database another program wrote (no mpsearch tables) is not given them by a reader either.
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StorageError, match="has no mpsearch tables; run `mpsearch db upgrade"):
        Storage(f"sqlite:///{other}", create=False)
    assert [r[0] for r in sqlite3.connect(other).execute("SELECT name FROM sqlite_master")] == ["t"]


def test_an_error_that_is_not_a_connection_error_is_reported_at_once(postgres_url):
    """A statement the server refuses is not a lost connection: no retry, no "cannot reach"."""
    import time

    storage = Storage(postgres_url)
    start = time.perf_counter()
    with pytest.raises(StorageError, match=r"refused the operation \(.*no_such_table.*\); this is not a connection problem, so it was not retried"):
        storage.retrying(lambda: storage.engine.connect().exec_driver_sql("SELECT * FROM no_such_table"))
    assert time.perf_counter() - start < 1.0
