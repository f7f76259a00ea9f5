"""`mpsearch search` as users run it: JSON output, bad input, and a driver killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from mpsearch.storage import Storage
from mpsearch.storage.trials import RERUN_OF as ATTR_RERUN_OF
from mpsearch.storage.trials import plan_of

from conftest import tiny_study

MENU = (2, 3, 4, 8, 16)


def mpsearch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mpsearch", *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def test_search_json_follows_the_design_and_a_second_run_needs_resume(tmp_path):
    spec = tiny_study(tmp_path, bits=MENU)
    out = mpsearch("search", str(spec), "--budget", "3.5bpw", "--trials", "8", "--workers", "0", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert doc["study"] == "study-3.5bpw" and doc["n_complete"] == 8
    best = doc["best"]
    assert set(best) >= {"trial", "loss", "bytes", "bpw", "plan"} and best["bytes"] <= doc["budget_bytes"]
    assert set(doc["baselines"]) == {"ilp-perturbation", "ilp-hessian", "greedy", "uniform-3", "uniform-2"}
    assert all(set(b) >= {"loss", "bytes", "bpw"} for b in doc["baselines"].values())
    # The pooler, which the mean-pooled loss never reads, is named and left out of every plan.
    assert doc["unseen"] == {"layers": ["pooler.dense"], "policy": "exclude"} and "pooler.dense" not in json.dumps(best["plan"])
    # The best plan and every baseline are scored once more, on the test split no trial was selected on.
    for row in [best, *doc["baselines"].values()]:
        assert row["test_loss"] > 0 and row["test_loss"] != row["loss"]

    again = mpsearch("search", str(spec), "--budget", "3.5bpw", "--trials", "8", "--workers", "0")
    assert again.returncode == 2 and "already exists; pass --resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr

    more = mpsearch("search", str(spec), "--budget", "3.5bpw", "--trials", "10", "--workers", "0", "--resume", "--json")
    assert more.returncode == 0, more.stderr[-2000:]
    assert json.loads(more.stdout)["n_complete"] == 10

    # A study that already has its trials is reported as it is: no Ray, no bank, no profiles.
    done = mpsearch("search", str(spec), "--budget", "3.5bpw", "--trials", "10", "--workers", "2", "--resume", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["n_complete"] == 10, done.stderr[-2000:]
    assert "Ray" not in done.stderr and "ray" not in done.stderr, done.stderr[-2000:]

    listed = mpsearch("trials", "study-3.5bpw", "--storage", f"sqlite:///{tmp_path / 'mpsearch.db'}", "--json")
    rows = json.loads(listed.stdout)["trials"]
    assert [r["source"] for r in rows[:2]] == ["ilp-perturbation", "ilp-hessian"] and len(rows) == 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "1000"], "below the smallest plan"),
        (["--budget", "20bpw"], "above the largest plan"),
        (["--budget", "lots"], "cannot read 'lots'"),
        (["--trials", "0"], "--trials"),
        (["--time-limit", "0"], "--time-limit"),
    ],
)
def test_bad_search_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = mpsearch("search", str(tiny_study(tmp_path, bits=MENU)), "--workers", "0", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1


def _complete(storage: Storage) -> int:
    if "killed" not in optuna.get_all_study_names(storage.optuna()):
        return 0
    trials = optuna.load_study(study_name="killed", storage=storage.optuna()).get_trials(deepcopy=False)
    return sum(t.state == TrialState.COMPLETE for t in trials)


def _kill_mid_trial(args: list[str], storage: Storage, at_least: int, signum: int = signal.SIGKILL, stderr=subprocess.DEVNULL, seen_running: bool = True) -> int | None:
    """Start a driver, send it `signum` once `at_least` trials are complete and (with
    `seen_running`) one is seen running; its exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # As in a terminal, SIGINT is the driver's KeyboardInterrupt. A test run started in the
    # background (`cmd &`) inherits SIGINT ignored, and Python then installs no handler: the
    # driver would not see the signal at all (this failed a background CI run that way).
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    driver = subprocess.Popen([sys.executable, "-m", "mpsearch", *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env, preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.1)
            if "killed" not in optuna.get_all_study_names(storage.optuna()):
                continue
            trials = optuna.load_study(study_name="killed", storage=storage.optuna()).get_trials(deepcopy=False)
            if sum(t.state == TrialState.COMPLETE for t in trials) >= at_least and (not seen_running or any(t.state == TrialState.RUNNING for t in trials)):
                driver.send_signal(signum)
                break
        driver.wait(timeout=300)  # a loaded machine: the driver fails its trial and gives back its lease first
    finally:
        driver.kill()
    return driver.returncode


def test_a_driver_killed_with_sigkill_resumes_without_losing_or_duplicating_a_trial(tmp_path, postgres_url):
    """The real fault: SIGKILL mid-study on PostgreSQL, then --resume to exactly N complete trials."""
    spec = tiny_study(tmp_path, bits=MENU)
    args = ["search", str(spec), "--budget", "3.5bpw", "--trials", "24", "--workers", "0", "--storage", postgres_url, "--study", "killed"]
    storage = Storage(postgres_url)
    # A trial is short, so the kill can land just after one finished and before the next was
    # asked. Kill again (each time after a --resume) until the dead driver left a trial RUNNING.
    running: dict[int, dict] = {}
    for attempt in range(4):
        done = _complete(storage) if attempt else 0
        assert _kill_mid_trial(args + (["--resume"] if attempt else []), storage, at_least=done + 3) == -signal.SIGKILL
        trials = optuna.load_study(study_name="killed", storage=storage.optuna()).get_trials(deepcopy=False)
        # The plan is the trial's parameters (its bits); killed right after the ask, the
        # trial may not have its plan attribute yet.
        running = {t.number: {k: int(v) for k, v in t.params.items()} for t in trials if t.state == TrialState.RUNNING}
        if running:
            break
    before = {t.number: (t.values[0], plan_of(t.user_attrs).bits()) for t in trials if t.state == TrialState.COMPLETE}
    layers = len(next(iter(before.values()))[1])
    half_made = {n for n, plan in running.items() if len(plan) < layers}  # killed inside Optuna's ask
    assert 3 <= len(before) < 24 and running

    out = mpsearch(*args, "--resume", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["n_complete"] == 24
    trials = optuna.load_study(study_name="killed", storage=storage.optuna()).get_trials(deepcopy=False)
    after = {t.number: t for t in trials if t.state == TrialState.COMPLETE}
    assert len(after) == 24
    for number, (loss, plan) in before.items():  # nothing finished was lost or changed
        assert after[number].values[0] == loss and plan_of(after[number].user_attrs).bits() == plan
    # A trial the dead driver left running failed and its plan ran again, once; nothing else re-ran.
    for number, plan in running.items():
        failed = next(t for t in trials if t.number == number)
        assert failed.state == TrialState.FAIL
        reruns = [t for t in after.values() if t.user_attrs.get(ATTR_RERUN_OF) == number]
        if number in half_made:  # never a whole plan, never evaluated: nothing to re-run
            assert not reruns
        else:
            assert len(reruns) == 1 and plan_of(reruns[0].user_attrs).bits() == plan
    assert all(t.user_attrs.get(ATTR_RERUN_OF) in running for t in after.values() if t.user_attrs.get(ATTR_RERUN_OF) is not None)


def test_ctrl_c_on_an_in_process_search_fails_the_trial_it_was_running(tmp_path, postgres_url):
    """SIGINT with --workers 0 lands inside the trial's evaluation (64 sentences: most of a trial's
    time): that trial is failed and marked to run again, nothing is left RUNNING, and the next
    --resume runs its plan. Sent as a trial runs, the signal can still arrive just after it was
    told; then no trial is in flight and none is failed, which is right too."""
    spec = tiny_study(tmp_path, bits=MENU)
    spec.write_text(spec.read_text().replace("evaluation = 8", "evaluation = 64"))
    args = ["search", str(spec), "--budget", "3.5bpw", "--trials", "12", "--workers", "0", "--storage", postgres_url, "--study", "killed"]
    storage = Storage(postgres_url)
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        # Not waiting to *see* a trial running: a poll starved of CPU by the driver can miss every
        # sub-second trial (it did once in CI, and the search ended untouched). With --workers 0 a
        # trial is running nearly all the time, so the signal still lands in one almost always.
        code = _kill_mid_trial(args, storage, at_least=2, signum=signal.SIGINT, stderr=err, seen_running=False)
    assert code not in (0, None, -signal.SIGINT), log.read_text()[-2000:]  # it handled the interrupt and exited
    assert "Traceback" not in log.read_text()
    trials = optuna.load_study(study_name="killed", storage=storage.optuna()).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) <= 1 and all(t.user_attrs.get("rerun") is True for t in failed)
    assert all("error" not in t.user_attrs for t in trials if t.state == TrialState.COMPLETE)
    out = mpsearch(*args, "--resume", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["n_complete"] == 12, out.stderr[-2000:]
    trials = optuna.load_study(study_name="killed", storage=storage.optuna()).get_trials(deepcopy=False)
    for t in failed:  # its plan ran again, once
        assert sum(r.user_attrs.get(ATTR_RERUN_OF) == t.number for r in trials if r.state == TrialState.COMPLETE) == 1
