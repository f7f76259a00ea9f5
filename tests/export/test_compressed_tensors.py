"""``export --target compressed-tensors``: a Hugging Face folder that transformers itself loads,
with the outputs of mpsearch's own loader (real transformers, real compressed-tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mpsearch.export import export_study, load_quantized, read_plan
from mpsearch.export.loader import MODEL_FILE, sha256_of
from mpsearch.export.targets import TARGETS
from mpsearch.export.targets.compressed_tensors import FOLDER, VERIFY_RTOL

from test_export import MENU, Study, gpt2_study, minilm_study, mixed_plan, mpsearch, outputs


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Study:
    return minilm_study(tmp_path_factory.mktemp("ct-minilm"))


@pytest.fixture(scope="module")
def minilm_asymmetric(tmp_path_factory) -> Study:
    return minilm_study(tmp_path_factory.mktemp("ct-minilm-asym"), "minilm-asym", symmetric=False)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, tiny_gpt2_dir) -> Study:
    return gpt2_study(tmp_path_factory.mktemp("ct-gpt2"), tiny_gpt2_dir)


def from_pretrained(folder: Path, causal: bool) -> torch.nn.Module:
    """What a user runs: an Auto class of transformers, nothing of mpsearch."""
    from transformers import AutoModel, AutoModelForCausalLM

    return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(folder).eval()


@pytest.mark.parametrize("which", ["minilm", "minilm_asymmetric", "gpt2"])
def test_transformers_loads_the_folder_and_gives_the_loaders_outputs(which, request, tmp_path):
    study: Study = request.getfixturevalue(which)
    out = tmp_path / "export"
    result = export_study(study.storage, study.name, out, trial=study.mixed, target="compressed-tensors")
    folder = out / FOLDER
    doc = read_plan(out)
    table = study.workload.layer_table()
    assert doc.plan.bits() == mixed_plan(table).bits() and set(doc.plan.bits().values()) == set(MENU)

    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    info = result.targets["compressed-tensors"]
    assert info["max_rel_diff"] is not None and info["max_rel_diff"] <= VERIFY_RTOL

    # Every planned layer is in exactly one config group, or dense with its reason and in `ignore`.
    targeted = [t for group in qc["config_groups"].values() for t in group["targets"]]
    assert len(targeted) == len(set(targeted))
    dense = info["dense"]
    assert set(targeted) | set(dense) >= set(table.names) and not set(targeted) & set(dense)
    if which == "gpt2":  # Conv1D is no module type compressed-tensors quantizes: all dense
        assert not targeted and all("Conv1D" in why or "16 bits" in why for why in dense.values())
    else:
        assert len(targeted) == sum(1 for n in table.names if doc.plan[n].bits != 16)
        assert all("16 bits" in why for why in dense.values()) and set(dense) <= set(qc["ignore"])
        assert "pooler.dense" in qc["ignore"]  # left out of the plan (its loss cannot see it): FP, and said so
        layer = next(n for n in table.names if doc.plan[n].bits == 2)
        group = next(g for g in qc["config_groups"].values() if layer in g["targets"])
        assert group["weights"]["num_bits"] == 2 and group["weights"]["symmetric"] == (which == "minilm")
        assert group["format"] == ("pack-quantized" if which == "minilm" else "naive-quantized")
        with safe_open(str(folder / MODEL_FILE), framework="pt") as f:
            keys = set(f.keys())
            if which == "minilm":  # 2-bit codes, 16 to an int32 word
                packed = f.get_tensor(f"{layer}.weight_packed")
                assert packed.dtype == torch.int32 and packed.numel() * 16 == table.layer(layer).n
            else:  # asymmetric: signed codes one per byte, zero points beside them
                codes = f.get_tensor(f"{layer}.weight")
                assert codes.dtype == torch.int8 and int(codes.min()) >= -2 and int(codes.max()) <= 1
                assert f"{layer}.weight_zero_point" in keys
            assert f"{layer}.weight" in keys or f"{layer}.weight_packed" in keys

    # Loaded by transformers: exactly mpsearch's loader's outputs, and not the FP model's.
    hf = from_pretrained(folder, causal=which == "gpt2")
    ours = load_quantized(out, study.workload.build_model())
    fp = study.workload.fp_model()
    for got, expected, original in zip(outputs(hf, study.workload), outputs(ours, study.workload), outputs(fp, study.workload)):
        torch.testing.assert_close(got, expected, rtol=VERIFY_RTOL, atol=0)
        assert (got - original).abs().max() > 1e-3 * original.abs().max()  # the quantization is really there
    # The decoded 2-bit weight has at most 4 levels per group in transformers too.
    if which == "minilm":
        w = dict(hf.named_modules())[layer].weight.detach()
        assert all(len(torch.unique(g)) <= 4 for g in w[0].split(table.layer(layer).group_size))

    # plan.json records the folder's model file; the README says how to load it.
    assert doc.files[f"{FOLDER}/{MODEL_FILE}"].sha256 == sha256_of(folder / MODEL_FILE)
    assert doc.files[f"{FOLDER}/{MODEL_FILE}"].tensor_bytes == info["tensor_bytes"]
    readme = (out / "README.md").read_text()
    assert f'from_pretrained("{FOLDER}")' in readme and "vLLM" in readme  # 2- and 3-bit layers: vLLM cannot run them
    assert (folder / "tokenizer.json").is_file()
    # Recorded with every file, the folder's included.
    record = study.storage.exports(study.name)[-1]
    assert {f.path for f in record.files} >= {f"{FOLDER}/{MODEL_FILE}", f"{FOLDER}/config.json", MODEL_FILE}


def test_a_folder_whose_outputs_differ_from_the_loaders_is_caught(minilm, tmp_path):
    """The export's check is real: one changed code word in the file, and it names the difference."""
    from safetensors.torch import load_file, save_file

    from mpsearch.export import ExportError
    from mpsearch.export.targets import compressed_tensors as ct

    out = tmp_path / "e"
    export_study(minilm.storage, minilm.name, out, trial=minilm.mixed, target="compressed-tensors", verify=False)
    ours = load_quantized(out, minilm.workload.build_model())
    assert ct.check(out / FOLDER, ours, minilm.workload) <= VERIFY_RTOL
    tensors = load_file(str(out / FOLDER / MODEL_FILE))
    name = next(k for k in sorted(tensors) if k.endswith(".weight_packed"))
    tensors[name][0, 0] ^= 0x5A5A5A5A
    save_file(tensors, str(out / FOLDER / MODEL_FILE), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="differ from mpsearch's loader"):
        ct.check(out / FOLDER, ours, minilm.workload)


def test_vllm_problems_name_every_layer_below_4_bits(minilm, tmp_path):
    result = export_study(minilm.storage, minilm.name, tmp_path / "e", trial=minilm.mixed, target="compressed-tensors", verify=False)
    plan = read_plan(tmp_path / "e").plan
    below = {n for n in plan if plan[n].bits in (2, 3)}
    named = {p.split(":")[0] for p in result.targets["compressed-tensors"]["vllm_problems"]}
    assert named == below and below


def test_force_replaces_an_export_with_its_target_folder_and_a_bad_target_is_refused(minilm, tmp_path):
    out = tmp_path / "e"
    export_study(minilm.storage, minilm.name, out, trial=minilm.mixed, target="compressed-tensors", verify=False)
    export_study(minilm.storage, minilm.name, out, trial=minilm.mixed, force=True, verify=False)  # the mpsearch target alone
    assert not (out / FOLDER).exists() and (out / MODEL_FILE).is_file()

    url = minilm.storage.url.render_as_string(hide_password=False)
    bad = mpsearch("export", minilm.name, "--storage", url, "--out", str(tmp_path / "bad"), "--target", "onnx")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "compressed-tensors" in bad.stderr
    assert not (tmp_path / "bad").exists()
    assert TARGETS == ("mpsearch", "compressed-tensors")


@pytest.mark.parametrize("which", ["minilm", "minilm_asymmetric"])
def test_each_layers_tensors_cost_what_the_compressed_tensors_ledger_says(which, request, tmp_path):
    """The ledger of target.format = "compressed-tensors" (mpsearch.quant.ct_layout) against the
    folder the export writes, layer by layer, for every width of the menu."""
    from mpsearch.quant.ct_layout import layer_bytes

    study: Study = request.getfixturevalue(which)
    out = tmp_path / "e"
    export_study(study.storage, study.name, out, trial=study.mixed, target="compressed-tensors", verify=False)
    doc, table = read_plan(out), study.workload.layer_table()
    with safe_open(str(out / FOLDER / MODEL_FILE), framework="pt") as f:
        for name in table.names:
            bits, layer = doc.plan[name].bits, table.layer(name)
            tensors = [f.get_tensor(k) for k in f.keys() if k.startswith(f"{name}.weight")]
            expected = layer_bytes(rows=layer.rows, cols=layer.cols, bits=bits, group_size=layer.group_size, symmetric=which == "minilm", scale_bytes=4)
            assert sum(t.numel() * t.element_size() for t in tensors) == expected, (name, bits)
            if bits == 16:  # dense, in fp16: exactly the 16-bit candidate, at half the float32 bytes
                assert [t.dtype for t in tensors] == [torch.float16]


@pytest.fixture(scope="module")
def ct_target(tmp_path_factory) -> Study:
    """A study that counts its layers in compressed-tensors' layout (target.format), with the mixed plan."""
    from mpsearch.spec import Spec

    from conftest import tiny_study
    from test_export import run_study

    folder = tmp_path_factory.mktemp("ct-target")
    spec = Spec.load(tiny_study(folder, bits=MENU)).with_overrides(
        budget="5.0bpw", search={"trials": 4, "workers": 0, "seed": 0}, target={"format": "compressed-tensors"},
    )
    return run_study(folder, spec, "ct-target")


def test_a_compressed_tensors_study_exports_the_folder_whose_bytes_it_searched(ct_target, tmp_path):
    from mpsearch.export import ExportError

    study, out = ct_target, tmp_path / "e"
    table = study.workload.layer_table()
    assert table.target == "compressed-tensors"
    result = export_study(study.storage, study.name, out, trial=study.mixed)
    doc = read_plan(out)
    names = {p.name for p in out.iterdir()}
    assert names >= {"config.json", MODEL_FILE, "plan.json", "README.md", "tokenizer.json"} and not names & {"FORMAT.md", ".mpsearch", FOLDER}
    assert set(doc.plan.bits().values()) == set(MENU)

    # bytes(plan) of the study's ledger is the folder's tensor bytes, in total and layer by layer.
    with safe_open(str(out / MODEL_FILE), framework="pt") as f:
        sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    assert sum(sizes.values()) == doc.totals.bytes == table.bytes(doc.plan) == result.bytes == doc.files[MODEL_FILE].tensor_bytes
    for entry in doc.layers:
        own = sum(n for k, n in sizes.items() if k.startswith(f"{entry.name}.weight"))
        assert own == entry.bytes == table.layer_bytes(entry.name, doc.plan[entry.name].bits), entry.name

    # transformers runs what the search scored: the trial's loss, from AutoModel alone.
    hf = from_pretrained(out, causal=False)
    assert study.workload.loss(hf, "evaluation") == pytest.approx(result.loss, rel=1e-4)
    assert result.targets["compressed-tensors"]["max_rel_diff"] <= VERIFY_RTOL
    assert result.targets["compressed-tensors"]["folder"] == str(out)
    assert 'from_pretrained(".")' in (out / "README.md").read_text()

    # mpsearch's loader and eval send the user to transformers; --target is refused, nothing written.
    with pytest.raises(ExportError, match="compressed-tensors export"):
        load_quantized(out)
    url = study.storage.url.render_as_string(hide_password=False)
    refused = mpsearch("export", study.name, "--storage", url, "--out", str(tmp_path / "x"), "--target", "compressed-tensors")
    assert refused.returncode == 2 and "drop --target" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "x").exists()
    # --force replaces it (tokenizer and config files are an export's own).
    export_study(study.storage, study.name, out, trial=study.mixed, force=True, verify=False)
    assert read_plan(out).files[MODEL_FILE].sha256 == sha256_of(out / MODEL_FILE)


def test_a_repaired_plan_reaches_the_folder_with_its_tuned_norms_and_biases(ct_target, tmp_path):
    """Repair tunes norms and biases too: the folder takes them from the export, not from the FP
    model (before this was fixed, transformers' outputs differed from the loader's by 1.6 %)."""
    study, out = ct_target, tmp_path / "e"
    result = export_study(study.storage, study.name, out, trial=study.mixed, repair_steps=5)
    assert result.repair["kept"]  # measured: the evaluation loss drops on this study's data
    assert result.targets["compressed-tensors"]["max_rel_diff"] <= VERIFY_RTOL
    fp = study.workload.fp_model().state_dict()
    with safe_open(str(out / MODEL_FILE), framework="pt") as f:
        norm = "encoder.layer.0.attention.output.LayerNorm.weight"
        assert not torch.equal(f.get_tensor(norm), fp[norm])
    hf = from_pretrained(out, causal=False)
    assert study.workload.loss(hf, "evaluation") == pytest.approx(result.repair["loss_after"], rel=1e-4)
