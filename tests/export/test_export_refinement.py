"""``export --refine sequential`` on a real MiniLM study: kept when the evaluation loss drops,
the plan's own candidates written when it does not, and the losses recorded."""

from __future__ import annotations

import json

import pytest
import torch

from mpsearch.export import export_study, read_plan
from mpsearch.export.loader import MODEL_FILE, file_layout, sha256_of

from test_export import Study, add_trial, gpt2_study, minilm_study, mpsearch


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Study:
    return minilm_study(tmp_path_factory.mktemp("refine-minilm"), "minilm-gptq", method="gptq")


def test_a_refinement_that_lowers_the_loss_is_kept_and_recorded(minilm, tmp_path):
    """Uniform 2-bit, where sequential GPTQ has the most error to compensate. Measured on this
    study: evaluation 0.9205 -> 0.8763, test 0.9369 -> 0.8720. At 3 and 4 bits it lowers the
    test loss too (0.1592 -> 0.1418, 0.0321 -> 0.0295) but not the loss on the 8 evaluation
    sentences (0.1295 -> 0.1357, 0.0254 -> 0.0270), so it is rightly not kept there; the mixed
    plan this test used before sits in between, and went either way with the data."""
    trial = add_trial(minilm.workload, minilm.storage, minilm.name, minilm.workload.layer_table().uniform(2))
    out = tmp_path / "refined"
    spec = minilm.workload.spec.base_dir / "study.toml"
    url = minilm.storage.url.render_as_string(hide_password=False)
    run = mpsearch("export", minilm.name, "--storage", url, "--out", str(out), "--trial", str(trial), "--refine", "sequential", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    r = result["refinement"]
    assert r["method"] == "sequential-gptq" and r["kept"] and r["loss_after"] < r["loss_before"] == result["loss"]
    assert r["test_loss_before"] == pytest.approx(result["test_loss"]) and r["test_loss_after"] is not None
    assert result["verified_loss"] == pytest.approx(r["loss_after"], rel=1e-4)  # the file holds the refined weights
    doc = read_plan(out)
    assert doc.provenance.refinement.kept and doc.provenance.refinement.loss_after == r["loss_after"]
    header = file_layout(out / MODEL_FILE)
    header.pop("__metadata__")
    assert sum(end - start for start, end in (t["data_offsets"] for t in header.values())) == doc.totals.bytes  # bytes(plan) unchanged
    scored = mpsearch("eval", str(out), str(spec), "--json")
    assert scored.returncode == 0, scored.stderr
    scored = json.loads(scored.stdout)
    assert scored["recorded_loss"] == r["loss_after"] and scored["loss"] == pytest.approx(r["loss_after"], rel=1e-4)


def test_blockwise_refinement_moves_codes_is_kept_recorded_and_loads_back(minilm, tmp_path):
    """``--refine blockwise`` at uniform 3 bits: sequential GPTQ, then each block's rounding and
    scales learned against the FP model's block outputs, on the 8 calibration sentences and the
    next 248 of the draw. Measured on this study, 50 steps a block, Adam at the default 1e-2:
    evaluation 0.1357 (sequential alone) -> 0.0774, test 0.1418 -> 0.0998. By the older signed
    descent at 1/200: 0.0830 and 0.0943; at 1/steps 0.0777 and 0.1033, and 20 steps (1/20) made
    test worse: 0.1665."""
    w = minilm.workload
    trial = add_trial(w, minilm.storage, minilm.name, w.layer_table().uniform(3))
    spec = w.spec.with_overrides(export={**w.spec.export.model_dump(), "blockwise_steps": 50, "repair_examples": 256})
    assert spec.digest() == w.spec.digest()  # an export setting: the study is the same
    sequential = export_study(minilm.storage, minilm.name, tmp_path / "seq", trial=trial, refine="sequential", verify=False)
    blockwise = export_study(minilm.storage, minilm.name, tmp_path / "blk", trial=trial, refine="blockwise", spec=spec)
    r = blockwise.refinement
    assert r["method"] == "sequential-gptq+blockwise" and (r["steps"], r["seed"], r["examples"]) == (50, w.spec.search.seed, 256)
    assert r["kept"] and r["loss_after"] < sequential.refinement["loss_after"] and r["test_loss_after"] < sequential.refinement["test_loss_after"]
    assert blockwise.verified_loss == pytest.approx(r["loss_after"], rel=1e-4)  # the file holds the new codes and scales
    assert read_plan(tmp_path / "blk").provenance.refinement == read_plan(tmp_path / "blk").provenance.refinement.model_validate(r)
    layouts = [file_layout(tmp_path / folder / MODEL_FILE) for folder in ("seq", "blk")]
    for layout in layouts:
        layout.pop("__metadata__")
    assert {k: (v["dtype"], v["shape"]) for k, v in layouts[0].items()} == {k: (v["dtype"], v["shape"]) for k, v in layouts[1].items()}  # bytes(plan) unchanged
    assert sha256_of(tmp_path / "seq" / MODEL_FILE) != sha256_of(tmp_path / "blk" / MODEL_FILE)


def test_blockwise_refinement_of_gpt2s_transposed_layers_loads_back(tmp_path_factory, tiny_gpt2_dir, tmp_path):
    """GPT-2 keeps its weights as (in, out) Conv1D matrices, in ragged asymmetric groups of 48:
    the learned codes are written and read back in the layout the loader expects. Measured on
    the tiny random GPT-2's mixed plan, 20 steps a block: evaluation 4.35e-5 -> 2.44e-5."""
    gpt2 = gpt2_study(tmp_path_factory.mktemp("refine-gpt2"), tiny_gpt2_dir)
    w = gpt2.workload
    spec = w.spec.with_overrides(export={**w.spec.export.model_dump(), "blockwise_steps": 20})
    result = export_study(gpt2.storage, gpt2.name, tmp_path / "blk", trial=gpt2.mixed, refine="blockwise", spec=spec)
    r = result.refinement
    assert r["method"] == "sequential-gptq+blockwise" and r["kept"] and r["loss_after"] < r["loss_before"]
    assert result.verified_loss == pytest.approx(r["loss_after"], rel=1e-4)


def test_a_refinement_that_does_not_help_falls_back_to_the_plans_candidates(minilm, tmp_path):
    """At 16 bits everywhere the refined weights are the fp16 candidates themselves: the loss
    cannot drop, so the plain export's file is written, byte for byte."""
    trial = add_trial(minilm.workload, minilm.storage, minilm.name, minilm.workload.layer_table().uniform(16))
    plain = export_study(minilm.storage, minilm.name, tmp_path / "plain", trial=trial, verify=False)
    refined = export_study(minilm.storage, minilm.name, tmp_path / "refined", trial=trial, refine="sequential")
    r = refined.refinement
    assert not r["kept"] and r["loss_after"] >= r["loss_before"]
    assert sha256_of(tmp_path / "refined" / MODEL_FILE) == sha256_of(tmp_path / "plain" / MODEL_FILE)
    assert refined.verified_loss == pytest.approx(plain.loss, rel=1e-4)
    assert read_plan(tmp_path / "refined").provenance.refinement.kept is False


def test_the_spec_turns_it_on_without_changing_the_study(minilm, tmp_path):
    spec = minilm.workload.spec.with_overrides(export={"refine": "sequential"})
    assert spec.digest() == minilm.workload.spec.digest()  # not a new study: only the export changes
    result = export_study(minilm.storage, minilm.name, tmp_path / "e", trial=minilm.mixed, spec=spec, verify=False)
    assert result.refinement is not None and result.refinement["method"] == "sequential-gptq"
    bad = mpsearch("export", minilm.name, "--storage", minilm.storage.url.render_as_string(hide_password=False), "--out", str(tmp_path / "b"), "--refine", "qat")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (tmp_path / "b").exists()
    blockwise = minilm.workload.spec.with_overrides(export={"refine": "blockwise", "blockwise_steps": 2})
    assert blockwise.digest() == minilm.workload.spec.digest()
    result = export_study(minilm.storage, minilm.name, tmp_path / "k", trial=minilm.mixed, spec=blockwise, verify=False)
    assert result.refinement["method"] == "sequential-gptq+blockwise" and result.refinement["steps"] == 2
    from mpsearch.errors import WorkloadError

    too_many = blockwise.with_overrides(export={**blockwise.export.model_dump(), "repair_examples": 10**6})  # block-wise rounding tunes on these too
    with pytest.raises(WorkloadError, match=r"^export.repair_examples = 1000000 but .*; lower it$"):
        export_study(minilm.storage, minilm.name, tmp_path / "bad", trial=minilm.mixed, spec=too_many, verify=False)
    assert not [p for p in tmp_path.iterdir() if "bad" in p.name]


def test_repair_is_kept_when_it_helps_reproducible_and_recorded(minilm, tmp_path):
    runs = [export_study(minilm.storage, minilm.name, tmp_path / f"r{i}", trial=minilm.mixed, repair_steps=12) for i in range(2)]
    r = runs[0].repair
    assert r["method"] == "repair" and r["steps"] == 12 and r["seed"] == minilm.workload.spec.search.seed
    assert r["kept"] and r["loss_after"] < r["loss_before"] == runs[0].loss and r["test_loss_after"] is not None
    assert runs[0].verified_loss == pytest.approx(r["loss_after"], rel=1e-4)  # the file holds the tuned scales and norms
    # Seeded: the same steps give the same file, byte for byte.
    assert runs[1].repair == {**r, "seconds": runs[1].repair["seconds"]}
    assert sha256_of(tmp_path / "r0" / MODEL_FILE) == sha256_of(tmp_path / "r1" / MODEL_FILE)
    doc = read_plan(tmp_path / "r0")
    assert doc.provenance.repair.kept and doc.provenance.refinement is None
    header = file_layout(tmp_path / "r0" / MODEL_FILE)
    header.pop("__metadata__")
    assert sum(end - start for start, end in (t["data_offsets"] for t in header.values())) == doc.totals.bytes


def test_a_repair_that_does_not_help_is_not_kept(minilm, tmp_path):
    """At 16 bits everywhere the loss is at its floor: a step can only raise it, so the file is the plain export's."""
    trial = add_trial(minilm.workload, minilm.storage, minilm.name, minilm.workload.layer_table().uniform(16))
    plain = export_study(minilm.storage, minilm.name, tmp_path / "plain", trial=trial, verify=False)
    repaired = export_study(minilm.storage, minilm.name, tmp_path / "repaired", trial=trial, repair_steps=2)
    assert not repaired.repair["kept"] and repaired.repair["loss_after"] >= repaired.repair["loss_before"]
    assert sha256_of(tmp_path / "repaired" / MODEL_FILE) == sha256_of(tmp_path / "plain" / MODEL_FILE)
    assert repaired.verified_loss == pytest.approx(plain.loss, rel=1e-4)


def test_the_repairs_hidden_state_term_is_on_by_default_recorded_and_can_be_turned_off(minilm, tmp_path):
    """The repair's objective adds each block's hidden-state error to the study's loss
    (``export.repair_hidden``, 10 by default); 0 tunes on the study's loss alone, another file."""
    w = minilm.workload
    batch = w.calibration_batches()[0]
    fp = w.fp_model()
    outputs, hidden = w.forward_hidden(fp, batch)
    assert hidden is not None and len(hidden) == fp.config.num_hidden_layers  # each block's output, not the embeddings
    with torch.no_grad():
        assert torch.equal(outputs.value, w.forward(fp, batch).value)  # asking for the hidden states changes no output
    from mpsearch.quant.repair import hidden_distance

    assert float(hidden_distance(hidden, hidden, batch["attention_mask"])) == 0.0
    on = export_study(minilm.storage, minilm.name, tmp_path / "on", trial=minilm.mixed, repair_steps=6, verify=False)
    off_spec = w.spec.with_overrides(export={**w.spec.export.model_dump(), "repair_hidden": 0.0})
    off = export_study(minilm.storage, minilm.name, tmp_path / "off", trial=minilm.mixed, repair_steps=6, spec=off_spec, verify=False)
    assert on.repair["hidden"] == 10.0 and off.repair["hidden"] == 0.0
    assert (on.repair["lr"], on.repair["schedule"]) == (1e-3, "constant")  # the defaults, recorded
    assert read_plan(tmp_path / "on").provenance.repair.hidden == 10.0
    assert on.repair["loss_after"] != off.repair["loss_after"]
    assert sha256_of(tmp_path / "on" / MODEL_FILE) != sha256_of(tmp_path / "off" / MODEL_FILE)


def test_repair_tunes_on_more_examples_when_the_spec_asks_and_never_on_held_out_ones(minilm, tmp_path):
    """``export.repair_examples``: the calibration split and the next examples of its seeded
    draw. The evaluation and test splits stay what they were; a count that would reach them is
    refused in one line, before anything is written."""
    w = minilm.workload
    calibration = sum(len(b["input_ids"]) for b in w.calibration_batches())
    spec = w.spec.with_overrides(export={**w.spec.export.model_dump(), "repair_examples": calibration + 8})
    assert spec.digest() == w.spec.digest()
    more = export_study(minilm.storage, minilm.name, tmp_path / "more", trial=minilm.mixed, repair_steps=4, spec=spec, verify=False)
    plain = export_study(minilm.storage, minilm.name, tmp_path / "plain", trial=minilm.mixed, repair_steps=4, verify=False)
    assert more.repair["examples"] == calibration + 8 and plain.repair["examples"] == calibration
    assert read_plan(tmp_path / "more").provenance.repair.examples == calibration + 8
    assert more.repair["loss_before"] == plain.repair["loss_before"]  # the same evaluation split
    assert more.repair["loss_after"] != plain.repair["loss_after"]  # tuned on other batches
    assert w.batches("repair") is w.calibration_batches() and w.reference("repair") is w.reference("calibration")  # unset: one copy
    from mpsearch.workload import Workload

    drawn = Workload(spec, device="cpu")
    held_out = {tuple(row.tolist()) for s in ("evaluation", "test") for b in drawn.batches(s) for row in b["input_ids"]}
    repair_rows = [tuple(row.tolist()) for b in drawn.batches("repair") for row in b["input_ids"]]
    assert not held_out & set(repair_rows)
    calibration_rows = [tuple(row.tolist()) for b in drawn.calibration_batches() for row in b["input_ids"]]
    assert len(repair_rows) == calibration + 8 and repair_rows[:calibration] == calibration_rows
    too_many = spec.with_overrides(export={**spec.export.model_dump(), "repair_examples": 10**6})
    from mpsearch.errors import WorkloadError

    with pytest.raises(WorkloadError, match=r"^export.repair_examples = 1000000 but .* examples outside evaluation and test; lower it$"):
        export_study(minilm.storage, minilm.name, tmp_path / "bad", trial=minilm.mixed, repair_steps=2, spec=too_many, verify=False)
    assert not [p for p in tmp_path.iterdir() if "bad" in p.name]  # no folder, no temporary one left behind


def test_the_repairs_learning_rate_and_schedule_come_from_the_spec_and_are_recorded(minilm, tmp_path):
    w = minilm.workload
    spec = w.spec.with_overrides(export={**w.spec.export.model_dump(), "repair_lr": 3e-3, "repair_schedule": "cosine"})
    assert spec.digest() == w.spec.digest()  # an export setting: the study is the same
    tuned = export_study(minilm.storage, minilm.name, tmp_path / "cosine", trial=minilm.mixed, repair_steps=4, spec=spec, verify=False)
    plain = export_study(minilm.storage, minilm.name, tmp_path / "constant", trial=minilm.mixed, repair_steps=4, verify=False)
    assert (tuned.repair["lr"], tuned.repair["schedule"]) == (3e-3, "cosine")
    provenance = read_plan(tmp_path / "cosine").provenance.repair
    assert (provenance.lr, provenance.schedule) == (3e-3, "cosine")
    assert tuned.repair["loss_before"] == plain.repair["loss_before"] and tuned.repair["loss_after"] != plain.repair["loss_after"]
