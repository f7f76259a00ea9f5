"""Real workloads: the pretrained MiniLM on stdlib text, small python: factories, and a tiny GPT-2.

Every one checks the contract later stages build on: the FP model scored against its own
reference outputs has zero loss, and a perturbed model has a finite, positive loss.
The zero threshold, 1e-6, is float32 rounding: measured at about 3e-8 on MiniLM.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from mpsearch.errors import WorkloadError
from mpsearch.spec import Spec
from mpsearch.workload import Workload

from conftest import write_spec

FP_ZERO = 1e-6


def perturb_(model: torch.nn.Module, table, scale: float = 0.05, seed: int = 0) -> None:
    """Add relative Gaussian noise to every quantizable weight, in place."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer in table.layers:
            w = modules[layer.name].weight
            w.add_(torch.randn(w.shape, generator=generator).to(w) * w.std() * scale)


def test_minilm_self_distillation_is_zero_at_fp_and_grows_with_noise(minilm_workload):
    w = minilm_workload
    assert w.loss_fn.name == "distill"
    assert abs(w.loss(w.fp_model())) < FP_ZERO
    small, large = w.build_model(), w.build_model()
    perturb_(small, w.layer_table(), scale=0.02)
    perturb_(large, w.layer_table(), scale=0.2)
    low, high = w.loss(small), w.loss(large)
    assert math.isfinite(high) and FP_ZERO < low < high < 1.0
    # build_model hands out independent copies: the FP model is untouched.
    assert abs(w.loss(w.fp_model())) < FP_ZERO


def test_minilm_batches_follow_the_spec(minilm_workload):
    data = minilm_workload.spec.data
    cal, ev = minilm_workload.calibration_batches(), minilm_workload.evaluation_batches()
    assert sum(len(b["input_ids"]) for b in cal) == data.calibration
    assert sum(len(b["input_ids"]) for b in ev) == data.evaluation
    assert all(b["input_ids"].shape[0] <= data.batch_size and b["input_ids"].shape[1] <= data.max_length for b in cal + ev)


def test_reference_outputs_are_computed_once(minilm_spec):
    w = Workload(minilm_spec, device="cpu")
    calls = []
    handle = w.fp_model().register_forward_hook(lambda *args: calls.append(1))
    try:
        first = w.loss(w.fp_model())
        after_first = len(calls)
        w.loss(w.fp_model())
        w.loss(w.fp_model())
    finally:
        handle.remove()
    n_batches = len(w.evaluation_batches())
    # First loss: one reference pass plus one scored pass; after that, scored passes only.
    assert after_first == 2 * n_batches
    assert len(calls) == 4 * n_batches
    assert w.reference("evaluation") is w.reference("evaluation")
    assert abs(first) < FP_ZERO


def test_a_reference_computed_in_pieces_is_the_one_computed_at_once(tiny_gpt2_dir):
    """``loss_terms`` of batch 0 (the reach test of every layer table) runs the FP model on that
    batch only; the rest follows on demand with the same tail draws as one whole pass."""
    text = f'[model]\nsource = "hf:{tiny_gpt2_dir}"\n[data]\ncalibration = 12\nevaluation = 4\nmax_length = 32\nbatch_size = 4\n[loss]\ntop_k = 64'
    whole, pieces = (Workload(Spec.from_toml(text), device="cpu") for _ in range(2))
    calls = []
    handle = pieces.fp_model().register_forward_hook(lambda *args: calls.append(1))
    try:
        pieces.loss_terms(pieces.fp_model(), "calibration", 0)
        assert len(calls) == 2  # the reference of batch 0, then the scored pass
        pieces.reference("calibration", 2)
        assert len(calls) == 3
    finally:
        handle.remove()
    a, b = whole.reference("calibration"), pieces.reference("calibration")
    assert len(a) == len(b) == 3 and all(x.topk.sample_index is not None for x in a)
    for x, y in zip(a, b):
        assert torch.equal(x.topk.index, y.topk.index) and torch.equal(x.topk.sample_index, y.topk.sample_index)
        assert torch.equal(x.topk.logprobs, y.topk.logprobs) and torch.equal(x.topk.sample_logprobs, y.topk.sample_logprobs)


def test_loss_terms_keep_autograd_for_sensitivity(minilm_workload):
    model = minilm_workload.build_model()
    weight = model.encoder.layer[0].attention.self.query.weight
    weight.requires_grad_(True)
    perturb_(model, minilm_workload.layer_table(), scale=0.1)
    total, count = minilm_workload.loss_terms(model, "calibration", 0)
    (total / count).backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_python_factory_model_with_tensor_data(tmp_path, factories_dir):
    torch.manual_seed(1)
    save_file({"inputs": torch.randn(48, 64)}, str(tmp_path / "x.safetensors"))
    spec = Spec.from_dict(
        {
            "model": {"source": "python:mpsearch_test_factories:mlp"},
            "data": {"source": str(tmp_path / "x.safetensors"), "calibration": 16, "evaluation": 32, "batch_size": 8},
            "quant": {"group_size": 32},
        },
        base_dir=factories_dir,
    )
    w = Workload(spec)
    table = w.layer_table()
    assert [(layer.name, layer.rows, layer.cols) for layer in table.layers] == [("0", 96, 64), ("2", 10, 96)]
    assert w.forward(w.fp_model(), w.evaluation_batches()[0]).kind == "tensor"  # so distill means MSE
    assert w.loss(w.fp_model()) == 0.0
    noisy = w.build_model()
    perturb_(noisy, table, scale=0.1)
    assert 0 < w.loss(noisy) < 1.0


def test_conv_factory_on_image_tensors(tmp_path, factories_dir):
    torch.manual_seed(2)
    save_file({"images": torch.randn(24, 3, 8, 8)}, str(tmp_path / "images.safetensors"))
    spec = Spec.from_dict(
        {
            "model": {"source": "python:mpsearch_test_factories:convnet"},
            "data": {"source": str(tmp_path / "images.safetensors"), "calibration": 8, "evaluation": 16, "batch_size": 8},
            "quant": {"group_size": -1},
            "budget": {"bpw": 8.0},
        },
        base_dir=factories_dir,
    )
    w = Workload(spec)
    assert [layer.kind for layer in w.layer_table().layers] == ["Conv2d", "Conv1d", "Linear"]
    assert w.loss(w.fp_model()) == 0.0
    noisy = w.build_model()
    perturb_(noisy, w.layer_table(), scale=0.2)
    assert 0 < w.loss(noisy) < 10.0


def gpt2_spec(tiny_gpt2_dir, loss: str, base_dir=None, **loss_fields) -> Spec:
    return Spec.from_dict(
        {
            "model": {"source": f"hf:{tiny_gpt2_dir}"},
            "data": {"calibration": 8, "evaluation": 16, "max_length": 32, "batch_size": 8},
            "loss": {"kind": loss, **loss_fields},
            "quant": {"group_size": 32},
        },
        base_dir=base_dir,
    )


def test_tiny_gpt2_from_a_config_distills_over_logits(tiny_gpt2_dir):
    w = Workload(gpt2_spec(tiny_gpt2_dir, "distill"))
    table = w.layer_table()
    assert {layer.kind for layer in table.layers} == {"Conv1D"} and len(table.layers) == 8
    assert w.forward(w.fp_model(), w.evaluation_batches()[0]).kind == "logits"  # so distill means KL
    assert abs(w.loss(w.fp_model())) < FP_ZERO
    noisy = w.build_model()
    perturb_(noisy, table, scale=0.5)
    assert FP_ZERO < w.loss(noisy) < 1.0


def test_tiny_gpt2_next_token_cross_entropy_is_near_uniform_when_untrained(tiny_gpt2_dir):
    w = Workload(gpt2_spec(tiny_gpt2_dir, "causal-lm"))
    ce = w.loss(w.fp_model())
    # A randomly initialised LM predicts close to uniformly over its 30522 tokens.
    assert abs(ce - math.log(30522)) < 0.5


def test_classification_error_rate_with_labels(tmp_path, factories_dir):
    rows = [f'{{"text": "sentence {i} {"good" if i % 2 else "bad"}", "label": {i % 2}}}' for i in range(40)]
    (tmp_path / "labelled.jsonl").write_text("\n".join(rows))
    spec = Spec.from_dict(
        {
            "model": {"source": "python:mpsearch_test_factories:text_classifier", "tokenizer": "minilm"},
            "data": {"source": str(tmp_path / "labelled.jsonl"), "calibration": 8, "evaluation": 32, "batch_size": 8},
            "loss": {"kind": "error-rate"},
            "quant": {"group_size": 32},
        },
        base_dir=factories_dir,
    )
    w = Workload(spec)
    rate = w.loss(w.fp_model())
    assert 0.0 <= rate <= 1.0
    logits = torch.cat([w.forward(w.fp_model(), b).value for b in w.evaluation_batches()])
    labels = torch.cat([b["labels"] for b in w.evaluation_batches()])
    assert rate == pytest.approx((logits.argmax(-1) != labels).float().mean().item())


def test_a_user_callable_loss(tiny_gpt2_dir, factories_dir):
    spec = gpt2_spec(tiny_gpt2_dir, "callable", base_dir=factories_dir, callable="mpsearch_test_factories:first_token_mse")
    w = Workload(spec)
    assert w.loss_fn.name == "callable"
    assert w.loss(w.fp_model()) == 0.0
    noisy = w.build_model()
    perturb_(noisy, w.layer_table(), scale=0.5)
    assert w.loss(noisy) > 0.0


@pytest.mark.parametrize(
    "model, words",
    [
        ({"source": "python:mpsearch_test_factories:not_a_model"}, "returned int, not an nn.Module"),
        ({"source": "python:no_such_module_here:f"}, "cannot import 'no_such_module_here'"),
        ({"source": "python:mpsearch_test_factories:nothing"}, "has no callable 'nothing'"),
        ({"source": "onnx:model.onnx"}, "unknown model source 'onnx'"),
        ({"source": "minilm:extra"}, "minilm takes no argument"),
    ],
)
def test_model_sources_that_cannot_load_say_why(factories_dir, model, words):
    spec = Spec.from_dict({"model": model}, base_dir=factories_dir)
    with pytest.raises(WorkloadError, match=f"^model.source: .*{words}"):
        Workload(spec).build_model()


def test_text_data_for_a_model_without_tokenizer_is_refused(factories_dir):
    spec = Spec.from_dict({"model": {"source": "python:mpsearch_test_factories:mlp"}, "data": {"calibration": 4, "evaluation": 4}}, base_dir=factories_dir)
    with pytest.raises(WorkloadError, match="^model.tokenizer: text data needs a tokenizer"):
        Workload(spec).calibration_batches()
