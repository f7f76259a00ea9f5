"""llama.cpp, built by ``mpsearch toolchain llama.cpp`` from the llama-cpp-python sdist's source,
run on MiniLM: the GGUF it converts embeds like the FP model, and llama-quantize writes the
types an export's tensor-type file states.

The build takes minutes (4 on 2 idle cores), so these tests use the one in mpsearch's cache:
without it they skip, unless ``MPSEARCH_REQUIRE_LLAMA_CPP=1`` (set by ``.ci/run``, which builds it
first), where a missing build fails them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from mpsearch.export import export_study, read_plan
from mpsearch.quant import llama_cpp
from mpsearch.workload.data import split
from mpsearch.workload.models import minilm_dir

from test_export import Study, minilm_study, mpsearch

K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
PLANNED = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 8: "Q8_0", 16: "F16"}


@pytest.fixture(scope="module")
def llama() -> llama_cpp.LlamaCpp:
    found = llama_cpp.built()
    if found is None:
        message = "llama.cpp is not built; run `mpsearch toolchain llama.cpp`"
        if os.environ.get("MPSEARCH_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def minilm_f32(llama, tmp_path_factory) -> Path:
    return llama.convert(minilm_dir(), tmp_path_factory.mktemp("gguf") / "minilm-f32.gguf", "f32")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Study:
    return minilm_study(tmp_path_factory.mktemp("llama-minilm"))


def test_the_build_is_reused_and_reports_its_tools(llama):
    stamp = (llama.root / "BUILT.json").stat().st_mtime_ns
    out = mpsearch("toolchain", "llama.cpp", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["version"] == llama_cpp.LLAMA_CPP_PYTHON and set(info["tools"]) == set(llama_cpp.TOOLS)
    assert all(os.access(p, os.X_OK) for p in info["tools"].values()) and Path(info["convert"]).is_file()
    assert (llama.root / "BUILT.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_the_converted_gguf_embeds_like_the_fp_model(llama, minilm_f32, minilm):
    """The pipeline a GGUF export will be checked with: convert_hf_to_gguf.py, then
    llama-embedding with mean pooling, against MiniLM in transformers on the evaluation texts."""
    spec = minilm.workload.spec
    texts = [t.replace("\n", " ") for t in split(spec.data, spec.resolve)[1].texts]
    ours = llama_cpp.embed(llama, minilm_f32, texts)
    model, tokenizer = minilm.workload.fp_model(), minilm.workload.loaded.tokenizer
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).double().numpy()
    cosines = (ours * pooled).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines.min()


def test_llama_quantize_writes_every_stated_type_it_can(llama, minilm_f32, minilm, tmp_path):
    """Every tensor of the plan and every weight it leaves alone has a line; llama-quantize (with a
    quantized base type: with f32 or f16 it applies none) writes each stated type where the type
    fits the tensor's rows, and falls back only where a K-quant does not (rows of 384)."""
    out = tmp_path / "export"
    export_study(minilm.storage, minilm.name, out, trial=minilm.mixed, verify=False)
    gguf = llama_cpp.quantize(llama, minilm_f32, tmp_path / "mixed.gguf", "q8_0", out / "llama_cpp_tensor_types.txt")
    written = llama_cpp.tensor_types(gguf)
    rules = [line.rsplit("=", 1) for line in (out / "llama_cpp_tensor_types.txt").read_text().splitlines()]
    stated = {}
    for tensor in written:
        hits = [kind.upper() for pattern, kind in rules if re.search(pattern, tensor)]
        assert len(hits) <= 1, tensor
        if hits:
            stated[tensor] = hits[0]
    weights = {t for t in written if t.endswith(".weight") and not t.endswith("norm.weight")}
    assert set(stated) == weights  # every weight matrix is named by the file
    assert stated["token_embd.weight"] == written["token_embd.weight"] == "F32"
    rows = _row_lengths(gguf)
    fell_back = {t for t in stated if written[t] != stated[t]}
    assert fell_back == {t for t in stated if stated[t] in K_QUANTS and rows[t] % 256}, fell_back
    doc = read_plan(out)
    assert {PLANNED[c.bits] for _, c in doc.entries()} >= {"Q2_K", "Q8_0", "F16"}  # the mix is really there


def _row_lengths(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return {t.name: int(t.shape[0]) for t in GGUFReader(str(path)).tensors}


def test_a_missing_build_is_named_with_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setenv(llama_cpp.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(llama_cpp.ToolchainError, match="mpsearch toolchain llama.cpp"):
        llama_cpp.tools()
    assert not (tmp_path / "empty").exists()  # looking builds nothing


def test_a_float_base_type_applies_no_line_of_the_file(llama, minilm_f32, tmp_path):
    """Why the docs say to give llama-quantize a quantized base type: with f32 the file is ignored."""
    types = tmp_path / "types.txt"
    types.write_text("^blk\\.0\\.attn_q\\.weight$=q8_0\n")
    ignored = llama_cpp.tensor_types(llama_cpp.quantize(llama, minilm_f32, tmp_path / "f32.gguf", "f32", types))
    applied = llama_cpp.tensor_types(llama_cpp.quantize(llama, minilm_f32, tmp_path / "q4.gguf", "q4_0", types))
    assert ignored["blk.0.attn_q.weight"] == "F32" and applied["blk.0.attn_q.weight"] == "Q8_0"
    assert applied["blk.1.attn_q.weight"] == "Q4_0"  # what the file leaves unnamed gets the base type
