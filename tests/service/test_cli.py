"""The installed `mpsearch` command, run as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mpsearch

from conftest import DEFAULT_STUDY, write_spec


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mpsearch", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_version():
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"mpsearch, version {mpsearch.__version__}"


def command_paths(group=None, prefix=()) -> list[tuple[str, ...]]:
    """Every command and subcommand of the CLI, hidden ones too."""
    import click

    from mpsearch.cli import cli

    group = group or cli
    paths = []
    for name, command in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
    return paths


def test_every_command_has_help():
    paths = command_paths()
    assert {("layers",), ("search",), ("jobs", "logs"), ("db", "upgrade"), ("job-run",)} <= set(paths)
    for args in [()] + paths:
        out = run(*args, "--help")
        assert out.returncode == 0 and "Usage: mpsearch" in out.stdout, args


def test_help_starts_without_loading_torch_ray_or_optuna():
    """`mpsearch --help` stays fast: the CLI imports the library inside its commands."""
    code = "import sys; from mpsearch.cli import main; main(['--help']); print(sorted(m for m in ('torch', 'ray', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:] + out.stderr[-500:]


def test_layers_json_on_the_default_study():
    out = run("layers", str(DEFAULT_STUDY), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    layers = doc["layers"]
    assert len(layers) == 36 and {row["kind"] for row in layers} == {"Linear"}
    assert layers[-1]["name"] == "encoder.layer.5.output.dense"
    assert sum(row["n"] for row in layers) == doc["n_weights"] == 10_616_832
    # The mean-pooled default loss never reads the pooler: named, and left at fp32 (layers.unseen).
    assert doc["unseen"] == ["pooler.dense"] and any(e["name"] == "pooler.dense" and "cannot see" in e["reason"] for e in doc["excluded"])
    for row in layers:
        rows, cols = row["shape"]
        assert row["n"] == rows * cols
        assert row["bytes"]["16"] == 2 * row["n"]
        assert row["bytes"]["4"] == row["n"] // 2 + rows * (cols // 128) * 2
        assert "rule" not in row
    for bits in ("2", "3", "4", "8", "16"):
        assert doc["total_bytes"][bits] == sum(row["bytes"][bits] for row in layers) + doc["other_bytes"]
    assert doc["budget"] == {"spec": "4bpw", "bytes": doc["other_bytes"] + 10_616_832 // 2, "bpw": 4.0}


def test_layers_table_for_people():
    out = run("layers", str(DEFAULT_STUDY))
    assert out.returncode == 0, out.stderr
    assert "36 quantizable layers, 10,616,832 weights" in out.stdout and "not quantized: pooler.dense — the loss cannot see it" in out.stdout
    assert "encoder.layer.5.output.dense" in out.stdout and "budget 4bpw" in out.stdout


def _bad(tmp_path: Path, text: str, extra: dict[str, str] | None = None) -> Path:
    for name, content in (extra or {}).items():
        (tmp_path / name).write_text(content)
    return write_spec(tmp_path, text)


CASES = {
    "missing spec": (None, "spec '.*nope.toml' does not exist"),
    "not toml": ("[model\n", ".*study.toml is not valid TOML: .*line 1"),
    "unknown field": ("[quant]\ngroupsize = 64\n", "quant.groupsize: unknown field"),
    "wrong type": ("[data]\nbatch_size = 'many'\n", "data.batch_size: expected an integer"),
    "bits outside the menu": ("[quant]\nbits = [2, 4, 7]\n", "quant.bits: 7 is not a supported bit-width"),
    "model path missing": ("[model]\nsource = 'hf:./no-model-here'\n", "model.source: model directory .* does not exist"),
    "empty data file": ("[data]\nsource = 'empty.txt'\n", "data.source: data file .* is empty"),
    "budget below all-2-bit": ("[budget]\nbpw = 1.0\n", "budget.bpw: 1bpw .* is below the smallest plan, all 2-bit"),
    "budget above all-16-bit": ("[budget]\nmib = 500\n", "budget.mib: 500MiB .* is above the largest plan, all 16-bit"),
    "include matches nothing": ("[layers]\ninclude = ['decoder.*']\n", "layers.include: pattern 'decoder.\\*' matches no quantizable layer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_no_traceback(tmp_path, case):
    text, pattern = CASES[case]
    path = tmp_path / "nope.toml" if text is None else _bad(tmp_path, text, {"empty.txt": ""})
    if case.startswith("budget"):  # `layers` lists the layers whatever the budget; a search needs one it can meet
        out = run("search", str(path), "--workers", "0", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--json")
    else:
        out = run("layers", str(path), "--json")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert re.match(f"^mpsearch: error: {pattern}", lines[0]), lines[0]


def test_usage_errors_are_one_line_too():
    out = run("layers")
    assert out.returncode == 2
    assert out.stderr.strip() == "mpsearch: error: Missing argument 'SPEC'; see `mpsearch layers --help`"


def test_quantize_gives_the_uniform_baseline(tmp_path):
    small = write_spec(tmp_path, """
        [model]
        source = "minilm"
        [data]
        calibration = 8
        evaluation = 32
        [quant]
        options = ["3a"]
    """)
    results = {}
    for bits in ("3", "8", "3a"):  # a scheme option is a menu entry too
        out = run("quantize", str(small), "--bits", bits, "--json")
        assert out.returncode == 0, out.stderr
        results[bits] = json.loads(out.stdout)
    results[3], results[8] = results.pop("3"), results.pop("8")
    # 3-bit asymmetric: a uint8 zero point a group of 128 beside the fp16 scale, 1/16 bit a weight more.
    assert results["3a"]["bits"] == "3a" and results["3a"]["bpw"] == 3.1875
    assert results["3a"]["loss"] < results[3]["loss"]
    assert set(results[3]) >= {"bits", "method", "bytes", "bpw", "loss"}
    assert results[3]["method"] == "rtn" and results[3]["bpw"] == 3.125 and results[8]["bpw"] == 8.125
    layers = json.loads(run("layers", str(DEFAULT_STUDY), "--json").stdout)
    assert results[3]["bytes"] == layers["total_bytes"]["3"]
    # On 32 sentences: 8-bit loses about 2e-4 of cosine similarity, 3-bit about 0.2.
    assert 0 < results[8]["loss"] < 1e-3 < 0.05 < results[3]["loss"] < 0.5


def test_quantize_refuses_bits_outside_the_menu(tmp_path):
    spec = write_spec(tmp_path, "[quant]\nbits = [4, 16]\n")
    out = run("quantize", str(spec), "--bits", "3")
    assert out.returncode == 2 and out.stderr.strip() == (
        "mpsearch: error: --bits 3 is not in the spec's menu [4, 16] (quant.bits and quant.options); pick one of those or add it to the spec"
    )
    out = run("quantize", str(spec), "--bits", "3a")
    assert out.returncode == 2 and "--bits 3a is not in the spec's menu" in out.stderr
    out = run("quantize", str(spec), "--bits", "4", "--method", "awq")
    assert out.returncode == 2 and "Invalid value for '--method': 'awq' is not one of 'rtn', 'gptq'" in out.stderr


def test_gptq_beats_rtn_on_the_whole_model(tmp_path):
    small = write_spec(tmp_path, """
        [data]
        calibration = 64
        evaluation = 32
        max_length = 64
    """)
    loss = {}
    for method in ("rtn", "gptq"):
        out = run("quantize", str(small), "--bits", "4", "--method", method, "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["method"] == method and doc["bpw"] == 4.125
        loss[method] = doc["loss"]
    # Measured on these 32 held-out sentences: rtn 0.0566, gptq 0.0183 (0.32 of it).
    assert loss["gptq"] < 0.5 * loss["rtn"]


def test_layers_errors_reports_sqnr_at_every_bit_width(tmp_path):
    small = write_spec(tmp_path, """
        [quant]
        method = "rtn"
        symmetric = false
    """)
    out = run("layers", str(small), "--errors", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["method"] == "rtn"
    for row in doc["layers"]:
        # null means no noise at all: pooler.dense's weights happen to be exact in fp16.
        sqnr = [math.inf if row["sqnr"][b] is None else row["sqnr"][b] for b in ("2", "3", "4", "8", "16")]
        assert sqnr == sorted(sqnr), row["name"]
        assert row["mse"]["2"] > row["mse"]["8"] > 0
    # Asymmetric rtn on MiniLM: the lowest SQNR over the layers is 5.04 / 11.94 / 18.48 / 42.82 dB
    # at 2 / 3 / 4 / 8 bits (tests/quant/test_rtn.py's measurement).
    lowest = {b: min(row["sqnr"][b] for row in doc["layers"]) for b in ("2", "3", "4", "8")}
    assert lowest == pytest.approx({"2": 5.04, "3": 11.94, "4": 18.48, "8": 42.82}, abs=0.01)
    table = run("layers", str(small), "--errors")
    assert table.returncode == 0 and "2-bit dB" in table.stdout and "signal-to-quantization-noise" in table.stdout


def test_layers_lists_the_layers_and_names_a_budget_out_of_range(tmp_path):
    spec = write_spec(tmp_path, 'budget = "20bpw"\n')
    out = run("layers", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["layers"]) == 36 and doc["budget"]["bytes"] is None
    assert "above the largest plan" in doc["budget"]["error"]
    table = run("layers", str(spec))
    assert table.returncode == 0 and "budget 20bpw: budget.bpw: 20bpw" in table.stdout and "above the largest plan" in table.stdout


def test_a_relative_sqlite_url_is_read_from_the_working_directory_and_the_environment_overrides_it(tmp_path):
    """storage.url is a database URL, read as --storage reads one: a relative SQLite path starts in
    the working directory (where `mpsearch export` and `studies` look by default), not beside the spec."""
    import sqlite3

    from conftest import tiny_spec_text

    folder = tmp_path / "specs"
    folder.mkdir()
    spec = write_spec(folder, tiny_spec_text() + '[storage]\nurl = "sqlite:///rel.db"\n')
    out = run("analyze", str(spec), "--method", "fisher", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "rel.db").is_file() and not (folder / "rel.db").exists()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPSEARCH_STORAGE": f"sqlite:///{tmp_path / 'env.db'}"}
    out = subprocess.run([sys.executable, "-m", "mpsearch", "analyze", str(spec), "--method", "fisher", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with sqlite3.connect(tmp_path / "env.db") as db:
        assert db.execute("SELECT count(*) FROM mpsearch_sensitivity_profiles").fetchone() == (1,)


def test_the_layers_table_keeps_a_grouping_rule_out_of_the_byte_columns(tmp_path, factories_dir):
    """A layer narrower than the group (here every layer of the MLP at group 128) gets a footnote, and
    the byte columns keep their digits at the default width."""
    import torch
    from safetensors.torch import save_file

    save_file({"inputs": torch.randn(16, 64)}, str(tmp_path / "x.safetensors"))
    spec = write_spec(tmp_path, f"""
        [model]
        source = "python:mpsearch_test_factories:mlp"
        [data]
        source = "x.safetensors"
        calibration = 8
        evaluation = 8
        [quant]
        group_size = 128
    """)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(factories_dir)
    out = subprocess.run([sys.executable, "-m", "mpsearch", "layers", str(spec)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "…" not in out.stdout, out.stdout
    assert "[1] per-channel: input dim 64 is smaller than group 128" in out.stdout, out.stdout
    assert re.search(r"\b0 \[1\]", out.stdout) and re.search(r"\b2 \[\d\]", out.stdout), out.stdout


def test_embeddings_with_gptq_fall_back_to_rtn_for_the_tables(tmp_path):
    """GPTQ needs a layer's inputs as a matmul sees them; an embedding has none, so its table is
    quantized with rtn (the bank's fallback) and the rest with GPTQ."""
    spec = write_spec(tmp_path, """
        [data]
        calibration = 8
        evaluation = 8
        max_length = 32
        [quant]
        method = "gptq"
        [layers]
        embeddings = true
    """)
    out = run("layers", str(spec), "--errors", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(out.stdout)["layers"]}
    assert rows["embeddings.word_embeddings"]["kind"] == "Embedding" and "rtn" in rows["embeddings.word_embeddings"]["note"]
    assert rows["embeddings.word_embeddings"]["sqnr"]["8"] > 30
    quantized = run("quantize", str(spec), "--bits", "8", "--json")
    assert quantized.returncode == 0, quantized.stderr[-2000:]
    assert json.loads(quantized.stdout)["loss"] < 0.01
