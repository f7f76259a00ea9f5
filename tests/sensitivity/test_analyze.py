"""Profiles: perturbation over Ray, ranking, reuse from the database, plots, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mpsearch.sensitivity.analyze import analyze, profile_key
from mpsearch.sensitivity.perturbation import perturbation_scores
from mpsearch.storage import Storage
from mpsearch.workload import Workload

from conftest import tiny_study, write_spec


@pytest.fixture(scope="module")
def tiny(minilm_spec):
    """MiniLM with 16 calibration sentences of up to 32 tokens, rtn: a scan takes seconds. The
    pooler, which the loss cannot see, is searched (layers.unseen), so the methods' exact 0 on it
    is checked."""
    spec = minilm_spec.with_overrides(
        data={**minilm_spec.data.model_dump(), "calibration": 16, "evaluation": 8, "max_length": 32, "batch_size": 8},
        quant={**minilm_spec.quant.model_dump(), "method": "rtn", "bits": [2, 3, 4, 8]},
        layers={**minilm_spec.layers.model_dump(), "unseen": "search"},
    )
    return Workload(spec, device="cpu")


@pytest.fixture
def local_ray():
    """A local Ray started by the code under test, shut down after the test."""
    yield
    import ray

    ray.shutdown()


def test_perturbation_on_two_ray_workers_matches_the_scan_in_process(tiny, local_ray):
    on_ray = perturbation_scores(tiny, workers=2)
    local = perturbation_scores(tiny, workers=0)
    assert on_ray.keys() == local.keys() == set(tiny.layer_table().names)
    for name in local:
        assert on_ray[name] == pytest.approx(local[name], rel=1e-4, abs=1e-7), name
    # The pooler is outside the mean-pooled loss: quantizing it changes nothing at all.
    assert local["pooler.dense"] == {2: 0.0, 3: 0.0, 4: 0.0, 8: 0.0}
    for name, per_bits in local.items():
        if name != "pooler.dense":
            assert per_bits[2] > per_bits[4] > abs(per_bits[8]), (name, per_bits)


def test_a_profile_is_read_back_until_something_it_depends_on_changes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MPSEARCH_CACHE_DIR", "")  # no disk cache: the database's own reuse
    store = Storage(f"sqlite:///{tmp_path / 'p.db'}")
    first = analyze(tiny, "fisher", store)
    assert not first.reused and len(first.ranking) == 37 and first.ranking[-1] == "pooler.dense"
    again = analyze(Workload(tiny.spec, device="cpu"), "fisher", store)
    assert again.reused and again.ranking == first.ranking and again.layers == first.layers
    other_data = tiny.spec.with_overrides(data={**tiny.spec.data.model_dump(), "seed": 1})
    assert not analyze(Workload(other_data, device="cpu"), "fisher", store).reused
    other_scheme = tiny.spec.with_overrides(quant={**tiny.spec.quant.model_dump(), "group_size": 64})
    assert not analyze(Workload(other_scheme, device="cpu"), "fisher", store).reused
    assert not analyze(tiny, "fisher", store, fisher_samples=2).reused  # other settings
    assert analyze(tiny, "fisher", store).reused  # the first one is still there


def test_a_new_database_reads_the_profile_from_the_disk_cache(tiny, tmp_path, monkeypatch):
    """A profile depends on the model, data, scheme and settings, not the database: a second
    database (a new SQLite file, a cluster's PostgreSQL) reads what the first computed and keeps
    it. A cache file that cannot be read is computed again and rewritten."""
    monkeypatch.setenv("MPSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    first = analyze(tiny, "fisher", Storage(f"sqlite:///{tmp_path / 'a.db'}"))
    (cached,) = (tmp_path / "cache" / "profiles").iterdir()
    assert not first.reused and cached.name.startswith("fisher-")
    second_db = Storage(f"sqlite:///{tmp_path / 'b.db'}")
    again = analyze(tiny, "fisher", second_db)
    assert again.reused and again.layers == first.layers and again.ranking == first.ranking and again.seconds == pytest.approx(first.seconds)
    assert second_db.find_profile(profile_key(tiny, "fisher", again.params)) is not None  # kept in the new database too
    assert not analyze(tiny, "fisher", Storage(f"sqlite:///{tmp_path / 'c.db'}"), fisher_samples=2).reused  # other settings
    cached.write_text('{"layers": [')  # cut short
    fresh = analyze(tiny, "fisher", Storage(f"sqlite:///{tmp_path / 'd.db'}"))
    assert not fresh.reused and fresh.layers == first.layers and json.loads(cached.read_text())["ranking"] == first.ranking
    assert not analyze(tiny, "fisher", Storage(f"sqlite:///{tmp_path / 'e.db'}"), recompute=True).reused


def test_hessian_and_fisher_estimate_the_same_traces(tiny):
    from scipy.stats import spearmanr

    hessian = analyze(tiny, "hessian", None, tol=0.1, max_probes=16)
    fisher = analyze(tiny, "fisher", None, fisher_samples=8)
    h = {row["name"]: row["trace"] for row in hessian.layers}
    f = {row["name"]: row["trace"] for row in fisher.layers}
    assert h["pooler.dense"] == f["pooler.dense"] == 0.0
    # Both estimate Tr of each layer's Gauss–Newton block. Measured: on the 10 largest layers
    # Fisher is within 4.3 % of Hutchinson; over all 36 the traces' rank correlation is 0.994.
    # (The small layers' Hutchinson estimates carry the cross-layer noise of all-at-once mode.)
    for name in sorted(h, key=h.get, reverse=True)[:10]:
        assert f[name] == pytest.approx(h[name], rel=0.1), name
    names = [n for n in h if n != "pooler.dense"]
    assert spearmanr([h[n] for n in names], [f[n] for n in names]).statistic > 0.95
    assert len(set(hessian.ranking[:5]) & set(fisher.ranking[:5])) >= 3


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mpsearch", *args], capture_output=True, text=True, cwd=cwd, env={**os.environ}, timeout=600)


def test_analyze_cli_json_plot_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("MPSEARCH_CACHE_DIR", str(tmp_path / "cache"))  # its own: the first run computes
    spec = tiny_study(tmp_path, bits=(3, 4, 8))
    out = run("analyze", str(spec), "--method", "fisher", "--json", "--plot", str(tmp_path / "fisher.png"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["method"] == "fisher" and not doc["reused"]
    assert {"name", "n", "trace", "score"} <= set(doc["layers"][0]) and set(doc["layers"][0]["score"]) == {"3", "4", "8"}
    assert sorted(doc["ranking"]) == sorted(row["name"] for row in doc["layers"])
    assert (tmp_path / "fisher.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run("analyze", str(spec), "--method", "fisher", "--json")
    assert json.loads(again.stdout)["reused"] is True
    table = run("analyze", str(spec), "--method", "fisher")
    assert table.returncode == 0 and "most sensitive first (from the database)" in table.stdout

    bad = run("analyze", str(spec), "--plot", str(tmp_path / "no" / "such" / "dir" / "x.png"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--plot: folder" in bad.stderr


def test_a_loss_without_a_hessian_is_refused_in_one_line(tmp_path):
    records = tmp_path / "labelled.jsonl"
    records.write_text("\n".join(json.dumps({"text": f"sentence number {i}", "label": i % 2}) for i in range(24)))
    spec = write_spec(tmp_path, f"""
        [model]
        source = "minilm"
        [data]
        source = "{records}"
        label_field = "label"
        calibration = 8
        evaluation = 8
        [loss]
        kind = "error-rate"
        [storage]
        url = "sqlite:///{tmp_path / 'e.db'}"
    """)
    out = run("analyze", str(spec))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "loss.kind 'error-rate' is not differentiable, so it has no Hessian; use --method perturbation" in out.stderr
