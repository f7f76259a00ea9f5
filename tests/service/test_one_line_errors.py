"""Inputs that used to end in a traceback: each gets one line that names the problem and what
to do, exit code 2, and nothing else on stderr."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import FACTORIES, tiny_spec_text


def mpsearch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mpsearch", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def one_line(out: subprocess.CompletedProcess, words: str) -> None:
    """Exit 2 and one error line; a progress bar drawn before the failure may precede it."""
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip() and not re.search(r"\d+%\||^\s+\.\.\.\s*$", line)]
    assert "Traceback" not in out.stderr and len(lines) == 1 and lines[0].startswith("mpsearch: error: "), out.stderr[-3000:]
    assert words in lines[0], out.stderr


def mlp_spec(folder: Path, extra: str = "", source: str = "python:factories:mlp") -> Path:
    """The `mlp` factory on 64-wide float tensors."""
    (folder / "factories.py").write_text(FACTORIES)
    torch.manual_seed(0)
    save_file({"inputs": torch.randn(32, 64)}, str(folder / "x.safetensors"))
    spec = folder / "study.toml"
    spec.write_text(
        f'[model]\nsource = "{source}"\n[data]\nsource = "x.safetensors"\ncalibration = 8\nevaluation = 8\n'
        f'[quant]\nmethod = "rtn"\ngroup_size = 32\n{extra}'
    )
    return spec


@pytest.mark.parametrize(
    "module, words",
    [
        ('raise RuntimeError("needs a GPU cluster")\n', "importing 'usermodel' raised RuntimeError: needs a GPU cluster; fix the module"),
        ("def model(:\n    pass\n", "'usermodel' has a syntax error at line 1"),
        ("import sys\nsys.exit(7)\n", "importing 'usermodel' called sys.exit(7); a module mpsearch imports must not exit"),
        ('def model():\n    raise ValueError("no checkpoint")\n', "usermodel.model() raised ValueError: no checkpoint; fix the factory"),
    ],
    ids=["raises-on-import", "syntax-error", "sys-exit", "factory-raises"],
)
def test_a_python_model_source_that_fails(tmp_path, module, words):
    spec = mlp_spec(tmp_path, source="python:usermodel:model")
    (tmp_path / "usermodel.py").write_text(module)
    one_line(mpsearch("layers", str(spec), cwd=tmp_path), words)


def test_a_callable_loss_that_raises(tmp_path):
    spec = mlp_spec(tmp_path, '[loss]\nkind = "callable"\ncallable = "userloss:loss"\n')
    (tmp_path / "userloss.py").write_text("def loss(output, reference, batch):\n    return batch['labels'].sum(), 1\n")
    one_line(mpsearch("quantize", str(spec), "--bits", "8", cwd=tmp_path), "userloss.loss(output, reference, batch) raised KeyError: 'labels'")


def test_an_hf_folder_with_a_corrupt_safetensors(tmp_path, tiny_gpt2_dir):
    shutil.copytree(tiny_gpt2_dir, tmp_path / "gpt2")
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(os.urandom(5000))
    (tmp_path / "study.toml").write_text('[model]\nsource = "hf:gpt2"\n')
    one_line(mpsearch("layers", "study.toml", cwd=tmp_path), "cannot load")
    out = mpsearch("layers", "study.toml", cwd=tmp_path)
    assert "SafetensorError" in out.stderr and "check the folder's files" in out.stderr


def test_float_tensors_given_to_a_token_model(tmp_path):
    save_file({"inputs": torch.randn(32, 16)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "study.toml").write_text('[data]\nsource = "x.safetensors"\ncalibration = 8\nevaluation = 8\n[quant]\nmethod = "rtn"\n')
    one_line(mpsearch("quantize", "study.toml", "--bits", "8", cwd=tmp_path), "the model takes token ids (input_ids) but the data gives float32 tensors")


def test_a_spec_nested_50000_deep(tmp_path):
    (tmp_path / "study.toml").write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    one_line(mpsearch("layers", "study.toml", cwd=tmp_path), "nests arrays or tables too deeply")


def test_a_study_name_too_long_for_any_backend_is_refused_before_any_work(tmp_path, postgres_url):
    (tmp_path / "study.toml").write_text(tiny_spec_text())
    out = mpsearch("search", "study.toml", "--workers", "0", "--trials", "2", "--storage", postgres_url, "--study", "s" * 600, cwd=tmp_path)
    one_line(out, "the study name is 600 characters long; use at most 512")


@pytest.mark.parametrize(
    "spec, args, words",
    [
        ('budget = "1e309bpw"\n', [], "inf is not a finite number"),
        ("", ["--budget", "1e309bpw"], "inf is not a finite number"),
        ("[search]\ntrials = 1000000000000\n", [], "search.trials"),
        ("", ["--trials", str(10**9)], "search.trials"),
        ('[search]\npruner = "hyperband"\n', [], "search.pruner: unknown pruner 'hyperband'; choose one of: forecast, halving, none, percentile, race"),
    ],
    ids=["infinite-budget-in-spec", "infinite-budget-flag", "trials-in-spec", "trials-flag", "unknown-pruner"],
)
def test_out_of_range_numbers(tmp_path, spec, args, words):
    (tmp_path / "study.toml").write_text(spec + tiny_spec_text())
    one_line(mpsearch("search", "study.toml", "--workers", "0", *args, cwd=tmp_path), words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, words", [("cuda", "device 'cuda' is not available"), ("gpu", "gpu")])
def test_a_device_this_machine_does_not_have(tmp_path, device, words):
    (tmp_path / "study.toml").write_text(tiny_spec_text())
    one_line(mpsearch("quantize", "study.toml", "--bits", "8", "--device", device, cwd=tmp_path), words)


def test_a_submitted_time_limit_of_zero(tmp_path):
    (tmp_path / "study.toml").write_text(tiny_spec_text())
    one_line(mpsearch("submit", "study.toml", "--address", "http://127.0.0.1:9", "--time-limit", "0", cwd=tmp_path), "--time-limit")
