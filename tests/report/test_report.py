"""`mpsearch report` and optuna-dashboard on a real study: MiniLM, a real search, real files."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import optuna
import pytest

from mpsearch.report import FIGURES, gather
from mpsearch.report import _figures as figures
from mpsearch.storage import Storage
from mpsearch.storage.trials import SENSITIVITY_ATTR, plan_of

from conftest import free_port, tiny_study, wait_for_port

MENU = (2, 3, 4, 8, 16)
STUDY = "reported"
PNGS = [f"{stem}.png" for stem, _, _ in FIGURES]


def mpsearch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mpsearch", *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 12-trial search on MiniLM (rtn, menu 2/3/4/8/16, 3.5 bpw), in-process: (storage URL, its `search --json`)."""
    folder = tmp_path_factory.mktemp("report")
    spec = tiny_study(folder, bits=MENU)
    out = mpsearch("search", str(spec), "--budget", "3.5bpw", "--trials", "12", "--workers", "0", "--study", STUDY, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    return f"sqlite:///{folder / 'mpsearch.db'}", json.loads(out.stdout)


def test_report_writes_a_self_contained_page_and_the_same_figures_as_pngs(study, tmp_path):
    url, result = study
    out = mpsearch("report", STUDY, "--storage", url, "--out", str(tmp_path / "r"), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    listed = {f["name"]: f["bytes"] for f in json.loads(out.stdout)["files"]}
    assert set(listed) == {"report.html", *PNGS}
    page = (tmp_path / "r" / "report.html").read_text()
    for name in PNGS:
        data = (tmp_path / "r" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) == listed[name]
        # The page embeds exactly the PNG written beside it.
        embedded = re.search(rf'<img id="{name[:-4]}" src="data:image/png;base64,([^"]+)"', page).group(1)
        assert base64.b64decode(embedded) == data
    # Nothing remote: no URL anywhere in an attribute, no script, no stylesheet link.
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page and "<link" not in page
    # The baselines table names every warm start with its loss, and the best trial.
    for name, row in result["baselines"].items():
        assert f"<td>{name}</td><td class=n>{row['trial']}</td><td class=n>{row['loss']:.6g}</td>" in page
    assert f"trial {result['best']['trial']}: loss {result['best']['loss']:.6g}" in page


def test_the_figures_draw_the_study_s_own_numbers(study):
    url, result = study
    data = gather(Storage(url, create=False), STUDY, top_k=5)
    best = result["best"]
    assert data.best.number == best["trial"] and len(data.top) == 5
    assert [r.loss for r in data.top] == sorted(r.loss for r in data.top)
    # A plan's bytes are the whole model's and its bpw the quantized layers': one affine ledger.
    assert all(data.bpw(r.bytes) == pytest.approx(r.attrs["bpw"], rel=1e-9) for r in data.complete)

    # The best-so-far line ends at the best loss; one dashed line per baseline, at its loss.
    ax = figures.loss_by_trial(data).axes[0]
    step = next(line for line in ax.get_lines() if line.get_label().startswith("best so far"))
    assert step.get_ydata()[-1] == pytest.approx(best["loss"])
    baselines = {line.get_label() for line in ax.get_lines()} - {step.get_label()}
    assert baselines == {f"{name} {row['loss']:.4g}" for name, row in result["baselines"].items()}

    # The bars are the best plan's bits, in layer order, on a log2 axis.
    plan = plan_of({"plan": best["plan"]}).bits()
    fig = figures.best_plan(data)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [math.log2(plan[name]) for name in data.layers]
    # Every searched layer's sensitivity, recorded with the study; the pooler, which the loss
    # cannot see, is not among them (layers.unseen = "exclude").
    assert data.sensitivity_method == "perturbation" and set(data.sensitivity) == set(data.layers)
    assert "pooler.dense" not in data.layers and all(data.sensitivity[n] > 0 for n in data.layers)

    # Each layer's column of the top-k grid sums to 1: every plan gives every layer one width.
    image = figures.top_k_bits(data).axes[0].get_images()[0].get_array()
    assert image.shape == (len(MENU), len(data.layers))
    assert all(abs(image[:, j].sum() - 1) < 1e-9 for j in range(len(data.layers)))


def test_a_report_is_replaced_only_with_force_and_other_files_stay(study, tmp_path):
    url, _ = study
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert mpsearch("report", STUDY, "--storage", url, "--out", str(out)).returncode == 0
    before = (out / "best_plan.png").read_bytes()
    again = mpsearch("report", STUDY, "--storage", url, "--out", str(out), "--top", "3")
    assert again.returncode == 2 and "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (out / "best_plan.png").read_bytes() == before
    assert mpsearch("report", STUDY, "--storage", url, "--out", str(out), "--top", "3", "--force").returncode == 0
    assert "top 3 plans" in (out / "report.html").read_text() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "report.html", *PNGS])  # no temporary left


def test_an_unknown_study_is_one_line_and_exit_2(study, tmp_path):
    url, _ = study
    out = mpsearch("report", "nope", "--storage", url, "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "no study named 'nope'" in out.stderr and STUDY in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_a_study_without_recorded_sensitivity_still_reports(study, tmp_path):
    """Studies made before the search recorded its profiles have none: the plan is drawn alone."""
    url, _ = study
    copy = tmp_path / "old.db"
    shutil.copy(url.removeprefix("sqlite:///"), copy)
    old = Storage(f"sqlite:///{copy}", create=False)
    optuna.load_study(study_name=STUDY, storage=old.optuna()).set_user_attr(SENSITIVITY_ATTR, None)
    data = gather(old, STUDY)
    assert data.sensitivity == {} and len(figures.best_plan(data).axes) == 1
    out = mpsearch("report", STUDY, "--storage", f"sqlite:///{copy}", "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "did not record its sensitivity" in (tmp_path / "r" / "report.html").read_text()


def test_optuna_dashboard_shows_each_layer_as_its_bits(study, tmp_path):
    """optuna-dashboard's own server on the study's database: every parameter is the layer's bit-width."""
    url, result = study
    port = free_port()
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or "optuna-dashboard"
    log = (tmp_path / "dashboard.log").open("wb")
    process = subprocess.Popen([dashboard, url, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, lambda: process.poll() is None, timeout_s=60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            summaries = client.get("/api/studies").json()["study_summaries"]
            study_id = next(s["study_id"] for s in summaries if s["study_name"] == STUDY)
            doc = client.get(f"/api/studies/{study_id}", params={"after": 0}).json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    complete = [t for t in doc["trials"] if t["state"] == "Complete"]
    assert len(complete) == result["n_complete"]
    stored = {t.number: plan_of(t.user_attrs).bits() for t in optuna.load_study(study_name=STUDY, storage=url).get_trials() if t.state.name == "COMPLETE"}
    for trial in complete:
        bits = {p["name"]: float(p["param_external_value"]) for p in trial["params"]}
        assert bits == {name: float(b) for name, b in stored[trial["number"]].items()}
        assert set(bits.values()) <= set(map(float, MENU))
    space = {p["name"]: p["distribution"] for p in doc["union_search_space"]}
    assert all(d == {"type": "FloatDistribution", "low": 2.0, "high": 16.0, "step": None, "log": True} for d in space.values())


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REQUIRE_BROWSER = os.environ.get("MPSEARCH_REQUIRE_BROWSER") == "1"  # .ci/run installs Chromium and sets it


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not REQUIRE_BROWSER, reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
def test_the_page_renders_in_headless_chromium_with_every_figure_loaded(study, tmp_path):
    """The page as a browser shows it, offline: every figure decoded at its PNG's own size, and
    nothing fetched but the page itself."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    url, _ = study
    assert mpsearch("report", STUDY, "--storage", url, "--out", str(tmp_path / "r")).returncode == 0
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get((tmp_path / "r" / "report.html").as_uri())
        deadline = time.monotonic() + 60
        while driver.execute_script("return document.readyState") != "complete" and time.monotonic() < deadline:
            time.sleep(0.2)
        images = driver.execute_script("return Array.from(document.images).map(i => [i.id, i.complete, i.naturalWidth, i.naturalHeight])")
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
        title = driver.title
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
    assert title == f"mpsearch report: {STUDY}"
    assert [i[0] for i in images] == [stem for stem, _, _ in FIGURES]
    for stem, complete, width, height in images:
        png = (tmp_path / "r" / f"{stem}.png").read_bytes()
        size = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
        assert complete and (width, height) == size, stem
    assert fetched == []
    assert (tmp_path / "page.png").stat().st_size > 10_000
