"""The gguf target end to end on MiniLM, with llama.cpp itself: a search over llama.cpp's types,
its candidates made by llama-quantize, and an export that llama.cpp runs.

Like tests/export/test_llama_cpp.py, these use the llama.cpp in mpsearch's cache (``.ci/run``
builds it and makes its absence a failure).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from mpsearch.errors import MPSearchError
from mpsearch.export import export_study, load_quantized, read_plan
from mpsearch.export.targets import gguf as target_gguf
from mpsearch.quant.gguf import gguf_tensor
from mpsearch.search.driver import Search
from mpsearch.spec import Spec
from mpsearch.storage import Storage
from mpsearch.workload import Workload
from mpsearch.workload.data import split

from conftest import tiny_spec_text
from test_export import mpsearch
from test_llama_cpp import llama  # noqa: F401 - the fixture: llama.cpp built, or skip (fail in CI)


# SmolLM2 over llama.cpp's types, small enough for CI. Its bank without an importance matrix does not
# depend on the data, so the two SmolLM2 tests below build it once, in the session's cache.
SMOLLM2_GGUF = (
    '[model]\nsource = "smollm2"\n[data]\nsource = "stdlib-paragraphs"\ncalibration = 8\nevaluation = 16\nmax_length = 64\nbatch_size = 4\n'
    '[loss]\ntop_k = 64\n[quant]\nbits = [2, 4, 16]\n[target]\nformat = "gguf"\n'
)


class GgufStudy:
    def __init__(self, folder, spec_path, workload, storage, name):
        self.folder, self.spec_path, self.workload, self.storage, self.name = folder, spec_path, workload, storage, name


@pytest.fixture(scope="module")
def study(llama, tmp_path_factory) -> GgufStudy:  # noqa: F811 - llama is the imported fixture
    folder = tmp_path_factory.mktemp("gguf-study")
    text = tiny_spec_text().replace("bits = [3, 8]\n", "") + f'[target]\nformat = "gguf"\n[budget]\nbpw = 4.5\n[search]\ntrials = 6\nworkers = 0\nseed = 0\n[storage]\nurl = "sqlite:///{folder / "mpsearch.db"}"\n'
    spec_path = folder / "gguf.toml"
    spec_path.write_text(text)
    spec = Spec.load(spec_path)
    workload = Workload(spec, device="cpu")
    storage = Storage(spec.storage.url)
    Search(workload, storage, study="gguf").run()
    return GgufStudy(folder, spec_path, workload, storage, "gguf")


def test_candidates_are_llama_cpps_own_blocks(study):
    table = study.workload.layer_table()
    bank = study.workload.candidate_bank()
    down, query = "encoder.layer.0.output.dense", "encoder.layer.0.attention.self.query"
    q2 = bank.candidate(down, 2)
    assert q2.type == "Q2_K" and q2.packed["blocks"].dtype == torch.uint8
    assert q2.packed["blocks"].numel() == q2.nbytes == table.layer_bytes(down, 2)
    assert bank.candidate(query, 2) is bank.candidate(query, 4)  # 2 bits stand for IQ4_NL on rows of 384
    assert bank.candidate(query, 4).type == "IQ4_NL"
    # More bits, less error, type by type, on real weights: the order the menu promises.
    for name in (down, query):
        sqnr = [bank.candidate(name, b).sqnr for b in table.levels(name)]
        assert sqnr == sorted(sqnr), (name, sqnr)
    assert 8.0 < q2.sqnr < bank.candidate(down, 3).sqnr < bank.candidate(down, 4).sqnr


def test_export_writes_the_planned_types_and_llama_cpp_runs_what_was_searched(study, tmp_path):
    out = tmp_path / "export"
    result = export_study(study.storage, study.name, out)
    table = study.workload.layer_table()
    doc = read_plan(out)
    assert set(p.name for p in out.iterdir()) == {"model.gguf", "plan.json", "README.md", "llama_cpp_tensor_types.txt"}
    written = {t.name: t for t in GGUFReader(str(out / "model.gguf")).tensors}
    for name, choice in doc.plan.layers.items():
        tensor = written[f"{gguf_tensor(name)}.weight"]
        assert choice.type == table.type_of(name, choice.bits) == tensor.tensor_type.name
        assert int(tensor.n_bytes) == table.layer_bytes(name, choice.bits)
    assert sum(int(written[f"{gguf_tensor(n)}.weight"].n_bytes) for n in doc.plan) == doc.totals.quantized_bytes
    assert doc.totals.bpw <= 4.5 and len({c.type for c in doc.plan.layers.values()}) >= 2
    for name in ("token_embd.weight", "position_embd.weight", "token_types.weight"):
        assert written[name].tensor_type.name == "F32"  # stated, not left to the base type
    report = result.targets["gguf"]
    assert report["embedding"]["mean"] >= target_gguf.MIN_MEAN_COSINE and report["embedding"]["texts"] == 8
    assert [r["planned"] for r in report["tensors"]] == [r["written"] for r in report["tensors"]]
    assert "| `blk.0.attn_q.weight` |" in (out / "README.md").read_text()
    with pytest.raises(MPSearchError, match="is a GGUF export"):
        load_quantized(out, study.workload.build_model())


def test_the_embedding_check_catches_a_runtime_that_disagrees(study, tmp_path):
    """A GGUF whose tensors are not the plan's (here: the plan's layers one level up) must fail the
    llama-embedding check against mpsearch's evaluation of the plan."""
    table = study.workload.layer_table()
    bank = study.workload.candidate_bank()
    plan = table.uniform(4)
    other = table.uniform(2)  # ffn_down at Q2_K instead of Q4_K
    target_gguf.write(tmp_path, study.workload, other, bank)
    texts = [f"The {i}th sentence about quantization and llama.cpp." for i in range(8)]
    ok = target_gguf.check_embeddings(tmp_path / target_gguf.FILE, study.workload, other, bank, texts)
    assert ok["mean"] >= target_gguf.MIN_MEAN_COSINE
    with pytest.raises(MPSearchError, match="does not run what was searched"):
        target_gguf.check_embeddings(tmp_path / target_gguf.FILE, study.workload, plan, bank, texts)


def test_the_cli_exports_a_gguf_study_again_with_force_and_refuses_what_it_cannot(study, tmp_path):
    url = Spec.load(study.spec_path).storage.url
    for extra, message in ((["--target", "compressed-tensors"], "its export is a GGUF"), (["--repair", "5"], "drop them")):
        done = mpsearch("export", study.name, "--out", str(tmp_path / "x"), "--storage", url, *extra)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "x").exists()
    for _ in range(2):  # the second time over the first: --force takes a GGUF export for an earlier export
        done = mpsearch("export", study.name, "--out", str(tmp_path / "g"), "--storage", url, "--force")
        assert done.returncode == 0, done.stderr
        assert "gguf: model.gguf, 36 tensors at their planned types; llama.cpp ran it: mean cosine 0.99" in done.stdout
    scored = mpsearch("eval", str(tmp_path / "g"), str(study.spec_path))
    assert scored.returncode == 2 and "is a GGUF export" in scored.stderr and "Traceback" not in scored.stderr


def test_smollm2_runs_in_llama_cpp_with_the_perplexity_mpsearch_measured(llama, tmp_path):  # noqa: F811
    """A LLaMA: llama.cpp's converter reorders the rows of q_proj and k_proj, and the bank keeps
    the model's order. The GGUF's blocks are the candidates' through that order, and
    llama-perplexity agrees with mpsearch's perplexity of the same plan within 1 %."""

    spec = Spec.from_toml(SMOLLM2_GGUF)
    workload = Workload(spec, device="cpu")
    table, bank = workload.layer_table(), workload.candidate_bank()
    plan = table.uniform(4)  # IQ4_NL on rows of 576, Q4_K on down_proj's 1536
    report = target_gguf.write(tmp_path, workload, plan, bank)
    assert {r["planned"] for r in report.tensors} == {"IQ4_NL", "Q4_K"} and all(r["planned"] == r["written"] for r in report.tensors)
    q = "model.layers.0.self_attn.q_proj"
    stored = np.asarray({t.name: t for t in GGUFReader(str(tmp_path / target_gguf.FILE)).tensors}["blk.0.attn_q.weight"].data)
    ours = bank.candidate(q, 4).packed["blocks"].numpy()
    assert not np.array_equal(stored, ours) and sorted(map(bytes, stored)) == sorted(map(bytes, ours))  # the same rows, reordered
    texts = split(spec.data, spec.resolve)[1].texts
    agreed = target_gguf.check_perplexity(tmp_path / target_gguf.FILE, workload, plan, bank, texts)
    assert agreed["gap"] <= target_gguf.MAX_PPL_GAP and agreed["tokens"] >= 2 * agreed["n_ctx"]
    with pytest.raises(MPSearchError, match="does not run what was searched"):  # the file against the FP16 plan: 5-6 % apart
        target_gguf.check_perplexity(tmp_path / target_gguf.FILE, workload, table.uniform(16), bank, texts)


def test_uniform_quantize_takes_each_layers_own_level(study):
    """`mpsearch quantize --bits 2`: llama.cpp has no 2-bit type for rows of 384, so those layers
    take IQ4_NL, and the size is the GGUF's."""
    done = mpsearch("quantize", str(study.spec_path), "--bits", "2", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    table = study.workload.layer_table()
    assert doc["method"] == "llama.cpp" and doc["bytes"] == table.bytes(table.uniform(2)) and doc["bpw"] == 3.875


def test_an_importance_matrix_weighs_llama_cpps_rounding_in_the_candidates_and_the_export(llama, tmp_path):  # noqa: F811
    """target.imatrix on SmolLM2: llama-imatrix measures each input column's mean squared activation
    on the calibration split; the candidates' importance-weighted error is lower than without it,
    and the export quantizes with the same matrix (write() checks every block is the candidate's)."""
    base = SMOLLM2_GGUF
    weighted = Workload(Spec.from_toml(base + "imatrix = true\n"), device="cpu")
    bank = weighted.candidate_bank(cache_dir=tmp_path / "banks")
    plain = Workload(Spec.from_toml(base), device="cpu").candidate_bank()  # the session's cache: the SmolLM2 test above built it
    assert bank.imatrix is not None and bank.imatrix.parent == tmp_path / "banks" and plain.imatrix is None and bank.key != plain.key
    matrix = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(str(bank.imatrix)).tensors}
    table, modules = weighted.layer_table(), dict(weighted.fp_model().named_modules())
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"):  # Q2_K (rows of 1536), IQ4_NL (576)
        key = f"{gguf_tensor(name)}.weight"
        importance = torch.from_numpy(matrix[f"{key}.in_sum2"] / matrix[f"{key}.counts"][0]).float()
        w, layer = modules[name].weight.detach(), table.layer(name)
        ours, theirs = bank.candidate(name, 2), plain.candidate(name, 2)
        assert ours.type == theirs.type and not torch.equal(ours.packed["blocks"], theirs.packed["blocks"])
        err = [float((importance * (w - c.dequantized(layer)) ** 2).sum()) for c in (ours, theirs)]
        assert err[0] < err[1], (name, err)
    # Read back from the cache with its matrix, the same candidates.
    again = Workload(Spec.from_toml(base + "imatrix = true\n"), device="cpu").candidate_bank(cache_dir=tmp_path / "banks")
    assert again.imatrix == bank.imatrix and torch.equal(again.candidate(name, 2).packed["blocks"], ours.packed["blocks"])

    plan = table.uniform(2)
    out = tmp_path / "export"
    out.mkdir()
    target_gguf.write(out, weighted, plan, bank)  # raises unless every planned tensor holds the candidate's blocks
    assert (out / target_gguf.IMATRIX_FILE).read_bytes() == bank.imatrix.read_bytes()
    texts = split(weighted.spec.data, weighted.spec.resolve)[1].texts
    assert target_gguf.check_perplexity(out / target_gguf.FILE, weighted, plan, bank, texts)["gap"] <= target_gguf.MAX_PPL_GAP


def test_an_importance_matrix_is_refused_where_llama_imatrix_cannot_make_one():
    from mpsearch.errors import WorkloadError

    spec = Spec.from_toml(tiny_spec_text().replace("bits = [3, 8]\n", "") + '[target]\nformat = "gguf"\nimatrix = true\n')
    with pytest.raises(WorkloadError, match="needs a causal LM"):  # MiniLM, an encoder
        Workload(spec, device="cpu").candidate_bank(cache_dir=None)
