"""Exports of real studies (MiniLM, and a GPT-2 with Conv1D layers): they load, run, and are the size promised."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from mpsearch.errors import MPSearchError
from mpsearch.export import ExportError, export_study, load_quantized, read_plan
from mpsearch.export.evaluate import resident_bytes
from mpsearch.export.loader import MODEL_FILE, PLAN_FILE, file_layout, sha256_of
from mpsearch.quant.modules import QuantizedModule
from mpsearch.plan import Plan
from mpsearch.search.allocate import Costs
from mpsearch.search.driver import Search
from mpsearch.search.space import space_for
from mpsearch.spec import Spec
from mpsearch.storage import Storage, TrialLog
from mpsearch.workload import Workload

from conftest import REPO, tiny_study, write_spec

MENU = (2, 3, 4, 8, 16)


def mpsearch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mpsearch", *args], capture_output=True, text=True, env=env, timeout=600)


def mixed_plan(table) -> Plan:
    """Every bit-width of the menu on the first layers, 4 bits elsewhere."""
    plan = table.uniform(4).bits()
    for name, bits in zip(table.names, MENU):
        plan[name] = bits
    return Plan.of_bits(plan)


def add_trial(workload: Workload, storage: Storage, study_name: str, plan: Plan) -> int:
    """Evaluate ``plan`` and record it as a complete trial, the way the driver records an enqueued plan."""
    table = workload.layer_table()
    meta = TrialLog.open(storage, study_name).meta
    log = TrialLog.open(storage, study_name, space=space_for(meta, Costs.of(table, None), table))
    bank = workload.candidate_bank()
    model = workload.fp_model()
    with bank.applied(model, plan):
        loss = workload.loss(model)
    trial = log.ask(plan, {"source": "test-mixed"})
    log.tell(trial, [loss])
    return trial.number


class Study:
    def __init__(self, workload: Workload, storage: Storage, name: str, mixed: int):
        self.workload, self.storage, self.name, self.mixed = workload, storage, name, mixed


def run_study(folder: Path, spec: Spec, name: str) -> Study:
    workload = Workload(spec, device="cpu")
    storage = Storage(spec.storage.url)
    Search(workload, storage, study=name).run()
    return Study(workload, storage, name, add_trial(workload, storage, name, mixed_plan(workload.layer_table())))


def minilm_study(folder: Path, name: str = "minilm-mixed", **quant) -> Study:
    """The tiny MiniLM spec over the whole menu at 5.0 bpw, 6 trials, plus the mixed plan."""
    spec = Spec.load(tiny_study(folder, bits=MENU)).with_overrides(budget="5.0bpw", search={"trials": 6, "workers": 0, "seed": 0})
    return run_study(folder, spec.with_overrides(quant=quant) if quant else spec, name)


def gpt2_study(folder: Path, model_dir: Path) -> Study:
    """A tiny GPT-2 (Conv1D layers, tied lm_head), gptq, asymmetric, ragged groups of 48."""
    path = write_spec(folder, f"""
        [model]
        source = "hf:{model_dir}"
        [data]
        calibration = 8
        evaluation = 8
        max_length = 32
        batch_size = 8
        [quant]
        method = "gptq"
        group_size = 48
        symmetric = false
        [budget]
        bpw = 6.0
        [search]
        trials = 6
        workers = 0
        [storage]
        url = "sqlite:///{folder / 'mpsearch.db'}"
    """)
    return run_study(folder, Spec.load(path), "gpt2-mixed")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Study:
    return minilm_study(tmp_path_factory.mktemp("export-minilm"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, tiny_gpt2_dir) -> Study:
    return gpt2_study(tmp_path_factory.mktemp("export-gpt2"), tiny_gpt2_dir)


def fake_quantized(study: Study, plan: Plan):
    model = study.workload.build_model()
    return study.workload.candidate_bank().apply(model, plan)


def outputs(model, workload: Workload) -> list[torch.Tensor]:
    with torch.no_grad():
        return [workload.forward(model, b).value for b in workload.evaluation_batches()]


@pytest.mark.parametrize("which", ["minilm", "gpt2"])
def test_an_export_loads_runs_and_is_exactly_the_size_of_its_plan(which, request, tmp_path):
    study: Study = request.getfixturevalue(which)
    out = tmp_path / "export"
    result = export_study(study.storage, study.name, out, trial=study.mixed)
    doc = read_plan(out)
    plan = doc.plan.bits()
    table = study.workload.layer_table()
    assert set(plan.values()) == set(MENU) and plan == mixed_plan(table).bits()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["FORMAT.md", "README.md", "llama_cpp_tensor_types.txt", "model.safetensors", "plan.json", "quantization_config.json"]
    )

    # The file's tensor bytes are bytes(plan), as DESIGN.md defines it.
    header = file_layout(out / MODEL_FILE)
    meta = header.pop("__metadata__")
    tensor_bytes = sum(end - start for start, end in (t["data_offsets"] for t in header.values()))
    assert tensor_bytes == table.bytes(plan) == doc.totals.bytes == result.bytes == doc.files[MODEL_FILE].tensor_bytes
    assert meta["format"] == "mpsearch-packed" and meta["format_version"] == "1"
    # Each layer's module kind (a GPT-2 Conv1D needs a transpose) and the other names of a tied,
    # unquantized tensor (GPT-2's lm_head is wte) are in the file itself, not only in plan.json.
    assert {m["name"]: m["kind"] for m in json.loads(meta["layers"])} == {e.name: e.kind for e in doc.layers}
    kinds = {"minilm": {"Linear"}, "gpt2": {"Conv1D"}}[which]
    assert {e.kind for e in doc.layers} == kinds
    assert json.loads(meta["shared"]) == ({"transformer.wte.weight": ["lm_head.weight"]} if which == "gpt2" else {})
    # gptq's own settings are listed for gptq only.
    assert ("damp" in doc.provenance.scheme) == ("act_order" in doc.provenance.scheme) == (table.scheme.method == "gptq")
    assert doc.totals.bpw == pytest.approx(table.bpw(plan))
    assert doc.plan[table.names[4]].method == "fp16" and doc.plan[table.names[0]].method == table.scheme.method

    # Loaded: every planned layer runs from packed codes, and the outputs are the fake-quantized ones.
    loaded = load_quantized(out, study.workload.build_model())
    modules = dict(loaded.named_modules())
    assert all(isinstance(modules[name], QuantizedModule) for name in table.names)
    for got, expected in zip(outputs(loaded, study.workload), outputs(fake_quantized(study, plan), study.workload)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    trial = optuna.load_study(study_name=study.name, storage=study.storage.optuna()).trials[study.mixed]
    assert study.workload.loss(loaded) == pytest.approx(trial.values[0], rel=1e-4)
    assert result.verified_loss == pytest.approx(trial.values[0], rel=1e-4)

    # What it holds in memory is what the plan costs (non-persistent buffers such as position ids aside).
    held = resident_bytes(loaded)
    assert abs(held - table.bytes(plan)) <= 0.01 * table.bytes(plan)

    # Recorded, with the sha256 of every file.
    record = study.storage.exports(study.name)[-1]
    assert record.id == result.export_id and record.trial == study.mixed and record.bytes == table.bytes(plan)
    assert {f.path: f.sha256 for f in record.files} == {p.name: sha256_of(p) for p in out.iterdir()}


def test_the_best_trial_is_the_default_fits_the_budget_and_sits_next_to_its_baselines(minilm, tmp_path):
    out = tmp_path / "best"
    result = export_study(minilm.storage, minilm.name, out)
    study = optuna.load_study(study_name=minilm.name, storage=minilm.storage.optuna())
    budget = study.user_attrs["mpsearch"]["budget_bytes"]
    fits = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["bytes"] <= budget]
    assert result.trial == min(fits, key=lambda t: (t.values[0], t.number)).number
    assert result.bytes <= budget and (out / MODEL_FILE).stat().st_size < budget + 64 * 1024  # the header is small
    # Both losses: the evaluation split's (selected on) and the test split's, which the search measured too.
    doc = read_plan(out)
    searched = TrialLog.open(minilm.storage, minilm.name).outcome().best
    assert doc.provenance.loss == result.loss == searched["loss"]
    assert doc.provenance.test_loss == pytest.approx(searched["test_loss"], rel=1e-4) and result.test_loss == doc.provenance.test_loss
    assert doc.provenance.data.test_digest not in (None, doc.provenance.data.evaluation_digest)
    readme = (out / "README.md").read_text()
    assert "uniform-4" in readme and f"trial {result.trial}" in readme
    assert readme.count("| `") == len(minilm.workload.layer_table().names)  # one table row per layer
    lines = (out / "llama_cpp_tensor_types.txt").read_text().splitlines()
    assert lines and all(re.fullmatch(r"\^\S+\\\.weight\$=(q2_K|q3_K|q4_K|q8_0|f16|f32)", line) for line in lines)
    # Every weight the plan leaves alone is stated too, at the dtype the export keeps it in (FP32),
    # so llama-quantize does not quantize it to its base type.
    rules = [line.rsplit("=", 1) for line in lines]
    for tensor in ("token_embd.weight", "position_embd.weight", "token_types.weight"):
        assert [kind for pattern, kind in rules if re.search(pattern, tensor)] == ["f32"], tensor
    # Each GGUF tensor of the six BERT blocks is matched by exactly one line, with the plan's type.
    doc = read_plan(out)
    types = {2: "q2_K", 3: "q3_K", 4: "q4_K", 8: "q8_0", 16: "f16"}
    rules = [line.rsplit("=", 1) for line in lines]
    for entry, choice in doc.entries():
        block, _, rest = entry.name.removeprefix("encoder.layer.").partition(".")
        role = {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
                "attention.output.dense": "attn_output", "intermediate.dense": "ffn_up", "output.dense": "ffn_down"}.get(rest)
        if role is None:
            assert entry.name == "pooler.dense" and "`pooler.dense`" in readme
            continue
        hits = [kind for pattern, kind in rules if re.search(pattern, f"blk.{block}.{role}.weight")]
        assert hits == [types[choice.bits]], entry.name
    config = json.loads((out / "quantization_config.json").read_text())
    assert {name: m["bits"] for name, m in config["modules"].items()} == doc.plan.bits()
    left = {"pooler.dense", "embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"}
    assert config["unquantized"] == dict.fromkeys(sorted(left), "float32") and left <= set(config["modules_to_not_convert"])
    for name, bits in doc.plan.bits().items():
        override = config["dynamic"].get(f"+:^{re.escape(name)}$")
        if bits == 16:
            assert name in config["modules_to_not_convert"] and override is None
        else:
            assert (override or config)["bits"] == bits and name not in config["modules_to_not_convert"]


def test_a_pareto_front_exports_by_index_smallest_first(minilm, tmp_path):
    spec = minilm.workload.spec.with_overrides(search={"trials": 8, "workers": 0, "seed": 0})
    Search(Workload(spec), minilm.storage, study="minilm-pareto", pareto=True).run()
    study = optuna.load_study(study_name="minilm-pareto", storage=minilm.storage.optuna())
    front = sorted(study.best_trials, key=lambda t: (t.user_attrs["bytes"], t.values[0]))
    assert len(front) >= 2
    smallest = export_study(minilm.storage, "minilm-pareto", tmp_path / "small", pareto_index=0, verify=False)
    largest = export_study(minilm.storage, "minilm-pareto", tmp_path / "large", pareto_index=len(front) - 1, verify=False)
    assert (smallest.trial, largest.trial) == (front[0].number, front[-1].number)
    assert smallest.bytes < largest.bytes and smallest.loss > largest.loss
    with pytest.raises(MPSearchError, match=f"the front has {len(front)} trials"):
        export_study(minilm.storage, "minilm-pareto", tmp_path / "none", pareto_index=len(front))


def test_format_md_is_enough_to_decode_the_weights_without_mpsearch(gpt2, tmp_path, monkeypatch):
    """Run the NumPy decoder printed in FORMAT.md on a real export (asymmetric, ragged groups)."""
    out = tmp_path / "export"
    export_study(gpt2.storage, gpt2.name, out, trial=gpt2.mixed, verify=False)
    text = (out / "FORMAT.md").read_text()
    assert text == (REPO / "docs" / "FORMAT.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "mpsearch" not in code
    monkeypatch.chdir(out)
    namespace: dict = {}
    exec(code, namespace)
    loaded = dict(load_quantized(out, gpt2.workload.build_model()).named_modules())
    doc = read_plan(out)
    assert set(namespace["weights"]) == set(doc.plan) and any(e.rule for e in doc.layers)
    for name, w in namespace["weights"].items():
        np.testing.assert_array_equal(w.astype(np.float32), loaded[name].matrix().numpy(), err_msg=name)
    # Its reader needs no safetensors package and reads bfloat16 scales, which NumPy has no type for.
    from safetensors.torch import save_file

    mixed = {"scales": torch.randn(4, 3, dtype=torch.bfloat16), "codes": torch.arange(5, dtype=torch.uint8), "bias": torch.randn(3)}
    save_file(mixed, tmp_path / "bf16.safetensors", metadata={"format": "test"})
    read, metadata = namespace["read_safetensors"](tmp_path / "bf16.safetensors")
    assert metadata == {"format": "test"} and set(read) == set(mixed)
    for name, t in mixed.items():
        np.testing.assert_array_equal(read[name], t.float().numpy() if t.is_floating_point() else t.numpy(), err_msg=name)


# -- bad input: one clear error, nothing left behind ----------------------------------------------


@pytest.fixture(scope="module")
def exported(minilm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "minilm"
    export_study(minilm.storage, minilm.name, out, trial=minilm.mixed, verify=False)
    return out


def damaged(exported: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    return copy


def rewrite(folder: Path, drop: str | None = None) -> None:
    """Rewrite model.safetensors (without tensor ``drop``) and make plan.json's checksum agree,
    so the damage is found by the tensor checks rather than the checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / MODEL_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)
    doc = json.loads((folder / "plan.json").read_text())
    doc["files"][MODEL_FILE].update(bytes=path.stat().st_size, sha256=sha256_of(path))
    (folder / "plan.json").write_text(json.dumps(doc))


def test_a_truncated_or_corrupted_file_is_refused(exported, minilm, tmp_path):
    truncated = damaged(exported, tmp_path / "t")
    path = truncated / MODEL_FILE
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(ExportError, match="truncated"):
        load_quantized(truncated, minilm.workload.build_model())

    flipped = damaged(exported, tmp_path / "f")
    with (flipped / MODEL_FILE).open("r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ExportError, match="sha256"):
        load_quantized(flipped, minilm.workload.build_model())

    garbage = damaged(exported, tmp_path / "g")  # a broken header that the checksum was told to expect
    (garbage / MODEL_FILE).write_bytes(b"\xff" * 4096)
    rewrite_checksum_only(garbage)
    with pytest.raises(ExportError, match="cannot be read as safetensors"):
        load_quantized(garbage, minilm.workload.build_model())

    out = mpsearch("eval", str(flipped), str(minilm.workload.spec.base_dir / "study.toml"))
    assert out.returncode == 2 and "sha256" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def rewrite_checksum_only(folder: Path) -> None:
    path = folder / MODEL_FILE
    doc = json.loads((folder / "plan.json").read_text())
    doc["files"][MODEL_FILE].update(bytes=path.stat().st_size, sha256=sha256_of(path))
    (folder / "plan.json").write_text(json.dumps(doc))


def test_a_missing_tensor_is_named(exported, minilm, tmp_path):
    for drop in ("encoder.layer.0.attention.self.query.scales", "embeddings.LayerNorm.weight"):
        folder = damaged(exported, tmp_path / drop)
        rewrite(folder, drop=drop)
        with pytest.raises(ExportError, match=re.escape(f"has no tensor '{drop}'")):
            load_quantized(folder, minilm.workload.build_model())


def test_a_plan_for_another_model_is_refused(exported, minilm, gpt2, tmp_path):
    with pytest.raises(ExportError, match="another model"):
        load_quantized(exported, gpt2.workload.build_model())
    gpt2_spec = gpt2.workload.spec.base_dir / "study.toml"
    out = mpsearch("eval", str(exported), str(gpt2_spec))
    assert out.returncode == 2 and "the plan is for another model" in out.stderr and "Traceback" not in out.stderr, out.stderr
    # Same architecture, other weights: the digest in plan.json tells them apart.
    other = minilm.workload.build_model()
    with torch.no_grad():
        other.encoder.layer[0].attention.self.query.bias.add_(1.0)
    from mpsearch.export import evaluate_export

    workload = Workload(minilm.workload.spec)
    workload.loaded.model = other  # the template every model of the workload is built from
    with pytest.raises(ExportError, match="the plan is for another model"):
        evaluate_export(exported, workload)


def test_eval_scores_an_export_from_its_packed_file(exported, minilm):
    out = mpsearch("eval", str(exported), str(minilm.workload.spec.base_dir / "study.toml"), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    plan = read_plan(exported)
    assert doc["bytes"] == plan.totals.bytes and doc["bpw"] == pytest.approx(plan.totals.bpw)
    # The CLI's spec evaluates on the study's own data, so the loss is the trial's.
    assert doc["loss"] == pytest.approx(plan.provenance.loss, rel=1e-4)
    # Without a model, the loader rebuilds the one plan.json names (here the packaged MiniLM).
    rebuilt = load_quantized(exported)
    assert sum(isinstance(m, QuantizedModule) for m in rebuilt.modules()) == len(plan.layers)
    assert minilm.workload.loss(rebuilt) == pytest.approx(plan.provenance.loss, rel=1e-4)


def test_export_refuses_bad_requests_before_writing_anything(minilm, tmp_path):
    url = str(minilm.storage.url.render_as_string(hide_password=False))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    out = mpsearch("export", minilm.name, "--storage", url, "--out", str(busy))
    assert out.returncode == 2 and "exists and is not empty; pass --force" in out.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    empty = "empty-study"
    optuna.create_study(study_name=empty, storage=minilm.storage.optuna())
    out = mpsearch("export", empty, "--storage", url, "--out", str(tmp_path / "none"))
    assert out.returncode == 2 and "no completed trial" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = mpsearch("export", "nope", "--storage", url, "--out", str(tmp_path / "none"))
    assert out.returncode == 2 and "no study named 'nope'" in out.stderr
    with pytest.raises(MPSearchError, match="not a completed trial"):
        export_study(minilm.storage, minilm.name, tmp_path / "none", trial=10_000)
    with pytest.raises(MPSearchError, match="one objective"):
        export_study(minilm.storage, minilm.name, tmp_path / "none", pareto_index=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_a_failed_check_leaves_nothing_and_force_replaces_only_when_done(minilm, exported, tmp_path):
    """A recorded loss that the export does not reproduce (here: edited in the database) aborts it."""
    import sqlalchemy as sa

    out = tmp_path / "out"
    shutil.copytree(exported, out)  # an earlier export, which --force may replace
    before = sorted(p.name for p in out.iterdir())
    (out / PLAN_FILE).write_text((out / PLAN_FILE).read_text() + " ")  # to tell it from the new one
    old_plan = (out / PLAN_FILE).read_text()
    # The recorded loss edited in the database, found by study name and trial number (plain SQL on Optuna's tables).
    trial_id = sa.text(
        "SELECT t.trial_id FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :s AND t.number = :n"
    )
    engine = sa.create_engine(minilm.storage.url)
    with engine.begin() as c:
        tid = c.execute(trial_id, {"s": minilm.name, "n": minilm.mixed}).scalar_one()
        c.execute(sa.text("UPDATE trial_values SET value = value * 2 WHERE trial_id = :t"), {"t": tid})
    try:
        with pytest.raises(ExportError, match="differs from trial"):
            export_study(minilm.storage, minilm.name, out, trial=minilm.mixed, force=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == before
        assert (out / PLAN_FILE).read_text() == old_plan
    finally:
        with engine.begin() as c:
            c.execute(sa.text("UPDATE trial_values SET value = value / 2 WHERE trial_id = :t"), {"t": tid})
    n = len(minilm.storage.exports(minilm.name))
    result = export_study(minilm.storage, minilm.name, out, trial=minilm.mixed, force=True)
    assert (out / PLAN_FILE).read_text() != old_plan and (out / MODEL_FILE).is_file() and result.verified_loss is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left
    assert len(minilm.storage.exports(minilm.name)) == n + 1


def test_force_replaces_only_an_earlier_export(minilm, exported, tmp_path):
    url = str(minilm.storage.url.render_as_string(hide_password=False))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    (notes / "sub").mkdir()
    out = mpsearch("export", minilm.name, "--storage", url, "--out", str(notes), "--force")
    assert out.returncode == 2 and "holds keep.txt, sub/, so it is not an earlier export" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in notes.iterdir()) == ["keep.txt", "sub"]
    # An export with a file of the user's added is not an export any more either.
    mixed = damaged(exported, tmp_path / "m")
    (mixed / "my-notes.md").write_text("mine")
    with pytest.raises(MPSearchError, match="holds my-notes.md"):
        export_study(minilm.storage, minilm.name, mixed, force=True, verify=False)
    # Nor is a folder of export-named files without an mpsearch plan.json.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "README.md").write_text("mine")
    with pytest.raises(MPSearchError, match="has no mpsearch plan.json"):
        export_study(minilm.storage, minilm.name, fake, force=True, verify=False)
    assert (fake / "README.md").read_text() == "mine" and (mixed / "my-notes.md").is_file()


def test_a_killed_exports_staging_folder_is_removed_by_the_next_and_a_failed_one_leaves_none(minilm, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is no longer alive
    stale = tmp_path / f".out.tmp-{dead.pid}-0000abcd"
    stale.mkdir()
    (stale / MODEL_FILE).write_bytes(b"\0" * 1000)
    live = tmp_path / f".out.tmp-{os.getppid()}-0000abcd"  # a live process's export: left alone
    live.mkdir()
    export_study(minilm.storage, minilm.name, tmp_path / "out", trial=minilm.mixed, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])

    # Failing (here: a spec other than the study's) after the staging folder was made: it is removed.
    spec = minilm.workload.spec
    bad = spec.with_overrides(quant={**spec.quant.model_dump(), "group_size": spec.quant.group_size // 2})
    with pytest.raises(MPSearchError, match="the spec differs"):
        export_study(minilm.storage, minilm.name, tmp_path / "again", trial=minilm.mixed, spec=bad, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_work(minilm):
    # /proc refuses new folders even to root, which a chmod'ed folder would not.
    url = str(minilm.storage.url.render_as_string(hide_password=False))
    start = time.monotonic()
    out = mpsearch("export", minilm.name, "--storage", url, "--out", "/proc/mpsearch-export")
    assert out.returncode == 2 and "cannot write beside --out '/proc/mpsearch-export'" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 30  # the process's start-up, not a model built and quantized
