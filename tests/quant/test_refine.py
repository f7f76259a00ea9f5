"""Sequential GPTQ of a chosen plan on real MiniLM: inputs from the already quantized layers,
early-stopped calibration passes, and the result reproducible."""

from __future__ import annotations

import pytest
import torch

from mpsearch.quant import input_moments
from mpsearch.quant.refine import sequential_forms
from mpsearch.spec import Spec
from mpsearch.workload import Workload

from conftest import DEFAULT_STUDY


@pytest.fixture(scope="module")
def workload() -> Workload:
    spec = Spec.load(DEFAULT_STUDY).with_overrides(
        data={"source": "stdlib-docs", "calibration": 32, "evaluation": 32, "max_length": 64, "batch_size": 16, "seed": 0}
    )
    return Workload(spec, device="cpu")


def test_an_early_stopped_pass_gives_the_same_moment_and_skips_the_rest_of_the_model(workload):
    model, table = workload.fp_model(), workload.layer_table()
    first, last = table.layers[0], table.layers[-1]
    calls = []
    handle = dict(model.named_modules())[last.name].register_forward_hook(lambda *_: calls.append(1))
    try:
        full = input_moments(model, table, workload.calibration_batches(), workload.forward, layers=[first])
        assert len(calls) == len(workload.calibration_batches())
        calls.clear()
        cut = input_moments(model, table, workload.calibration_batches(), workload.forward, layers=[first], stop_early=True)
        assert calls == []  # the last layer never ran
    finally:
        handle.remove()
    assert cut[first.name].count == full[first.name].count
    assert torch.equal(cut[first.name].xtx, full[first.name].xtx)


def test_each_layer_is_quantized_from_the_inputs_of_the_layers_already_quantized(workload):
    """The second layer's GPTQ sees the first layer's quantized output: its forms differ from the
    bank's (FP inputs), the first layer's are the bank's own, and a rerun gives the same bytes."""
    table = workload.layer_table()
    bits = {name: 3 for name in table.names}
    bank = workload.candidate_bank([3])
    forms, methods = sequential_forms(workload.build_model(), table, bits, workload.calibration_batches(), workload.forward)
    again, _ = sequential_forms(workload.build_model(), table, bits, workload.calibration_batches(), workload.forward)
    assert set(methods.values()) == {"gptq"} and set(forms) == set(table.names)
    for name in table.names:
        assert forms[name].keys() == again[name].keys() and all(torch.equal(forms[name][k], again[name][k]) for k in forms[name])
    first, later = table.layers[0].name, table.layers[-1].name
    assert all(torch.equal(forms[first][k], bank.candidate(first, 3).packed[k].cpu()) for k in forms[first])  # FP inputs either way
    assert not torch.equal(forms[later]["qweight"], bank.candidate(later, 3).packed["qweight"].cpu())
    # Shapes and dtypes are the bank's: an export's bytes do not change.
    for name in table.names:
        cand = bank.candidate(name, 3).packed
        assert {k: (t.shape, t.dtype) for k, t in forms[name].items()} == {k: (t.shape, t.dtype) for k, t in cand.items()}


def test_layers_fed_by_their_block_alone_get_the_inputs_the_whole_model_gives_them(workload, monkeypatch):
    """A layer inside a block is calibrated by running that block alone on its held inputs, and
    the layers fed the same tensor (query, key and value) by one pass; the forms are bit for bit
    those of a pass of the whole model per layer. The plan leaves a block out (all 16 bits: the
    next block's inputs come through it) and quantizes the pooler, which lies outside the blocks."""
    import mpsearch.quant.refine as refine

    spec = workload.spec
    workload = Workload(spec.with_overrides(layers={**spec.layers.model_dump(), "unseen": "search"}), device="cpu")  # the pooler too
    table = workload.layer_table()
    bits = {name: 16 if name.startswith("encoder.layer.2.") else 3 for name in table.names}
    bits["pooler.dense"] = 4
    passes = []
    monkeypatch.setattr(refine, "input_moments", lambda *a, **k: passes.append([l.name for l in k["layers"]]) or input_moments(*a, **k))
    fed, methods = sequential_forms(workload.build_model(), table, bits, workload.calibration_batches(), workload.forward)
    monkeypatch.undo()
    attention = [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    assert attention in passes and not any(attention[1] in p for p in passes if p != attention)
    assert len(passes) == 5 * 4 + 1  # 4 passes a quantized block (query/key/value, then one a layer), and the pooler's
    whole, whole_methods = sequential_forms(workload.build_model(), table, bits, workload.calibration_batches(), workload.forward, by_blocks=False)
    assert methods == whole_methods and methods["pooler.dense"] == "gptq" and methods["encoder.layer.2.output.dense"] == "fp16"
    for name in table.names:
        assert forms_equal(fed[name], whole[name]), name


def forms_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
