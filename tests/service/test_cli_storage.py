"""`mpsearch studies`, `trials` and `db upgrade` as a user runs them, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest

from mpsearch.storage import Storage
from mpsearch.storage.trials import BPW as ATTR_BPW
from mpsearch.storage.trials import BYTES as ATTR_BYTES
from mpsearch.storage.trials import ERROR as ATTR_ERROR

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpsearch", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ})


def fill(url: str) -> None:
    """Two studies as the search records them: loss as the value, bytes and bpw as attributes."""
    store = Storage(url)
    a = optuna.create_study(study_name="minilm-4bpw", storage=store.optuna())
    for loss, nbytes in ((0.30, 53_100_000), (0.12, 53_177_856), (0.20, 53_000_000)):
        trial = a.ask()
        trial.set_user_attr(ATTR_BYTES, nbytes)
        trial.set_user_attr(ATTR_BPW, round((nbytes - 47_795_712) * 8 / 10_764_288, 4))
        a.tell(trial, loss)
    failed = a.ask()
    failed.set_user_attr(ATTR_ERROR, "worker died (exit code 137)")
    a.tell(failed, state=optuna.trial.TrialState.FAIL)
    a.ask()  # one still running
    optuna.create_study(study_name="empty", storage=store.optuna())
    store.close()


def test_studies_and_trials_report_what_the_search_stored(storage_url):
    fill(storage_url)
    out = run("studies", "--storage", storage_url, "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)["studies"]}
    assert rows["minilm-4bpw"]["n_trials"] == 5
    assert rows["minilm-4bpw"]["states"] == {"complete": 3, "running": 1, "waiting": 0, "pruned": 0, "fail": 1}
    assert rows["minilm-4bpw"]["best"] == {"number": 1, "loss": 0.12, "bytes": 53_177_856, "bpw": 4.0}
    assert rows["empty"]["n_trials"] == 0 and rows["empty"]["best"] is None

    out = run("trials", "minilm-4bpw", "--storage", storage_url, "--json")
    assert out.returncode == 0, out.stderr
    trials = json.loads(out.stdout)["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL", "RUNNING"]
    assert [t["loss"] for t in trials[:3]] == [0.30, 0.12, 0.20] and trials[3]["loss"] is None
    assert trials[3]["error"] == "worker died (exit code 137)"
    assert all(t["duration_s"] >= 0 for t in trials[:4]) and trials[4]["duration_s"] is None

    table = run("studies", "--storage", storage_url)
    assert table.returncode == 0 and "minilm-4bpw" in table.stdout and "0.12" in table.stdout
    table = run("trials", "minilm-4bpw", "--storage", storage_url)
    assert table.returncode == 0 and "worker died (exit code 137)" in table.stdout


def test_the_storage_url_can_come_from_the_environment(tmp_path):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    fill(url)
    out = subprocess.run([sys.executable, "-m", "mpsearch", "studies", "--json"], capture_output=True, text=True, env={**os.environ, "MPSEARCH_STORAGE": url}, cwd=tmp_path)
    assert out.returncode == 0 and {row["name"] for row in json.loads(out.stdout)["studies"]} == {"minilm-4bpw", "empty"}


@pytest.mark.parametrize(
    "case",
    ["malformed url", "unreachable server", "wrong password", "unknown study", "newer database", "no database file"],
)
def test_bad_storage_input_is_one_line_and_exit_2(case, tmp_path, password_refusing_server):
    import sqlalchemy as sa

    if case == "malformed url":
        args, expected = ("studies", "--storage", "postgres:/oops"), "storage URL 'postgres:/oops' is malformed; use sqlite:///FILE.db or postgresql+psycopg://"
    elif case == "unreachable server":
        args, expected = ("studies", "--storage", "postgresql://postgres@127.0.0.1:1/test"), "cannot reach the database at 127.0.0.1:1 after 3 tries"
    elif case == "wrong password":
        url = f"postgresql://alice:secret@127.0.0.1:{password_refusing_server}/test"
        args, expected = ("studies", "--storage", url), "as 'alice' (connection failed:"
    elif case == "unknown study":
        url = f"sqlite:///{tmp_path / 'm.db'}"
        fill(url)
        args, expected = ("trials", "nope", "--storage", url), f"no study named 'nope' in '{url}'; known studies: empty, minilm-4bpw"
    elif case == "newer database":
        url = f"sqlite:///{tmp_path / 'm.db'}"
        Storage(url).close()
        engine = sa.create_engine(url)
        with engine.begin() as c:
            c.execute(sa.text("UPDATE mpsearch_alembic_version SET version_num = '0099'"))
        engine.dispose()
        args, expected = ("studies", "--storage", url), "has mpsearch schema 0099, newer than this mpsearch knows"
    else:
        url = f"sqlite:///{tmp_path / 'never.db'}"
        args, expected = ("studies", "--storage", url), "there is no database file"
    out = run(*args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("mpsearch: error: ") and "Traceback" not in out.stderr
    assert expected in out.stderr
    assert "secret" not in out.stderr  # a password never reaches a message
    if case == "no database file":
        assert not (tmp_path / "never.db").exists()  # a query creates nothing
