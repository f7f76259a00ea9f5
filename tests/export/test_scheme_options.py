"""Scheme options (``quant.options``): menu entries that are not a bit-width alone, carried from the
search through the export and the loader. A real MiniLM study searches a menu with three options;
a plan that uses every entry is exported, loaded and scored."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from mpsearch.export import export_study, load_quantized, read_plan
from mpsearch.export.loader import MODEL_FILE, file_layout
from mpsearch.plan import Plan
from mpsearch.quant.modules import QuantizedModule
from mpsearch.spec import Spec
from mpsearch.storage import TrialLog

from conftest import tiny_study
from test_export import Study, add_trial, mpsearch, outputs, run_study

OPTIONS = ("2g32", "3g64a", "4g64")
MENU = (2, "2g32", 3, "3g64a", 4, "4g64", 8, 16)


def LAYER_TENSORS(name: str) -> list[list[str]]:
    """A quantized layer's tensors in the file (its bias is counted apart, with the other tensors)."""
    return [[name, suffix] for suffix in ("qweight", "scales", "zeros", "weight")]


def every_entry(table) -> Plan:
    """Each menu entry on one of the first layers, 4 bits elsewhere."""
    widths = {name: 4 for name in table.names}
    widths.update(zip(table.names, MENU))
    return Plan.of_bits(widths)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
    folder = tmp_path_factory.mktemp("scheme-options")
    spec = Spec.load(tiny_study(folder, bits=(2, 3, 4, 8, 16)))
    spec = spec.with_overrides(quant={**spec.quant.model_dump(), "options": list(OPTIONS)}, budget="3.5bpw", search={"trials": 6, "workers": 0, "seed": 0})
    return run_study(folder, spec, "minilm-options")


def test_the_search_chooses_among_the_options_at_their_exact_bytes(study):
    table = study.workload.layer_table()
    assert table.menu == MENU  # bits, then options by their overhead
    layer = table.layer(table.names[0])
    # 2 bits in groups of 32: the codes, and a float16 scale a group; asymmetric adds a uint8 zero point a group.
    assert table.layer_bytes(layer.name, "2g32") == layer.n * 2 // 8 + layer.rows * (layer.cols // 32) * 2
    assert table.layer_bytes(layer.name, "3g64a") == layer.n * 3 // 8 + layer.rows * (layer.cols // 64) * 3
    log = TrialLog.open(study.storage, study.name)
    assert log.meta["space"] == "menu-index" and log.meta["menu"] == list(MENU)
    best = Plan.from_json(log.outcome().best["plan"])
    assert table.bytes(best) <= study.workload.budget_bytes()
    used = {w for r in log.records() if r.plan for w in table.check_plan(r.plan).values()}
    assert used & set(OPTIONS), "no trial took a scheme option"


def test_a_plan_of_every_entry_exports_at_its_bytes_and_loads_bit_exactly(study, tmp_path):
    table = study.workload.layer_table()
    plan = every_entry(table)
    trial = add_trial(study.workload, study.storage, study.name, plan)
    out = tmp_path / "export"
    result = export_study(study.storage, study.name, out, trial=trial)

    # Each layer is written in its own scheme, and the file's tensor bytes are bytes(plan).
    doc = read_plan(out)
    first = {name: doc.plan[name] for name in table.names[: len(MENU)]}
    assert [(c.bits, c.group_size, c.symmetric) for c in first.values()] == [
        (2, 128, True), (2, 32, True), (3, 128, True), (3, 64, False), (4, 128, True), (4, 64, True), (8, 128, True), (16, None, None),
    ]
    assert table.check_plan(doc.plan) == table.check_plan(plan)  # the resolved plan reads back as the same entries
    header = file_layout(out / MODEL_FILE)
    header.pop("__metadata__")
    tensor_bytes = sum(end - start for start, end in (t["data_offsets"] for t in header.values()))
    assert tensor_bytes == table.bytes(plan) == doc.totals.bytes == result.bytes
    for entry in doc.layers:
        layer_bytes = sum(end - start for key, (start, end) in ((k, t["data_offsets"]) for k, t in header.items()) if key.rsplit(".", 1) in LAYER_TENSORS(entry.name))
        assert layer_bytes == entry.bytes == table.layer_bytes(entry.name, table.check_plan(plan)[entry.name]), entry.name

    # Loaded from packed codes, every layer decodes to the very weight the trial scored.
    loaded = load_quantized(out, study.workload.build_model())
    modules = dict(loaded.named_modules())
    bank = study.workload.candidate_bank()
    widths = table.check_plan(plan)
    for name in table.names:
        assert isinstance(modules[name], QuantizedModule)
        expected = bank.candidate(name, widths[name]).dequantized(table.at(name, widths[name])[0])
        assert torch.equal(modules[name].matrix(torch.float32), expected.to(torch.float32)), name
    fake = bank.apply(study.workload.build_model(), plan)
    for got, want in zip(outputs(loaded, study.workload), outputs(fake, study.workload)):
        assert torch.equal(got, want)
    stored = optuna.load_study(study_name=study.name, storage=study.storage.optuna()).trials[trial].values[0]
    assert result.verified_loss == pytest.approx(stored, rel=1e-6)

    # `mpsearch eval` scores the file, on the study's data, to the trial's loss.
    run = mpsearch("eval", str(out), str(study.workload.spec.base_dir / "study.toml"), "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["loss"] == pytest.approx(stored, rel=1e-6)


def test_refinement_and_repair_keep_each_layers_scheme(study, tmp_path):
    table = study.workload.layer_table()
    trial = add_trial(study.workload, study.storage, study.name, every_entry(table))
    out = tmp_path / "refined"
    url = study.storage.url.render_as_string(hide_password=False)
    run = mpsearch("export", study.name, "--storage", url, "--out", str(out), "--trial", str(trial), "--refine", "sequential", "--repair", "4", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["refinement"]["loss_after"] is not None and result["repair"]["loss_after"] is not None
    # The database keeps each step's losses, as plan.json and --json give them.
    record = study.storage.exports(study.name)[-1]
    assert record.losses["refinement"] == result["refinement"] and record.losses["repair"] == result["repair"]
    assert record.losses["loss"] == result["loss"] and record.losses["test_loss"] == result["test_loss"]
    assert record.losses["verified_loss"] == pytest.approx(result["verified_loss"])
    header = file_layout(out / MODEL_FILE)
    header.pop("__metadata__")
    assert sum(end - start for start, end in (t["data_offsets"] for t in header.values())) == table.bytes(every_entry(table))
    # The file holds what it says: loaded, it scores the loss the export verified.
    loaded = load_quantized(out, study.workload.build_model())
    assert study.workload.loss(loaded) == pytest.approx(result["verified_loss"], rel=1e-5)
