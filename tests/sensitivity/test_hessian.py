"""Hutchinson traces against exact Hessian blocks, and their consistency on MiniLM."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, hessian

from mpsearch.sensitivity.fisher import fisher_diagonal
from mpsearch.sensitivity.hessian import hessian_traces, resolve_estimator, total_trace
from mpsearch.spec import Spec
from mpsearch.workload import Workload

from conftest import write_spec


@pytest.fixture(scope="module")
def mlp_workload(factories_dir, tmp_path_factory):
    """A 16→32→8 MLP on 96 random inputs, self-distilled with MSE: a GN Hessian at the FP weights."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("mlp")
    save_file({"x": torch.randn(96, 16, generator=torch.Generator().manual_seed(0))}, folder / "inputs.safetensors")
    spec_path = write_spec(folder, f"""
        [model]
        source = "python:mpsearch_test_factories:small_mlp"
        [data]
        source = "{folder / 'inputs.safetensors'}"
        calibration = 64
        evaluation = 32
        batch_size = 16
        [quant]
        method = "rtn"
        group_size = 8
    """)
    import sys

    sys.path.insert(0, str(factories_dir))
    return Workload(Spec.load(spec_path), device="cpu")


def exact_traces(workload) -> dict[str, float]:
    """Tr of each layer's own Hessian block, from torch.func over the calibration loss."""
    model = workload.fp_model()
    names = workload.layer_table().names
    params = {k: v.detach() for k, v in model.named_parameters()}
    batches, refs = workload.calibration_batches(), workload.reference("calibration")
    count = sum(float(workload.loss_fn(workload.forward(model, b), r, b)[1]) for b, r in zip(batches, refs))
    traces = {}
    for name in names:
        key = f"{name}.weight"

        def loss(w):
            total = 0.0
            for batch, ref in zip(batches, refs):
                out = functional_call(model, {**params, key: w}, (batch["x"],))
                total = total + workload.loss_fn(type(ref)(out, ref.kind), ref, batch)[0]
            return total / count

        h = hessian(loss)(params[key])  # (out, in, out, in)
        n = params[key].numel()
        traces[name] = float(torch.diagonal(h.reshape(n, n)).sum())
    return traces


def test_all_at_once_traces_are_within_5_percent_of_the_exact_ones(mlp_workload):
    exact = exact_traces(mlp_workload)
    estimate = hessian_traces(mlp_workload)  # the default tolerance
    for name, value in exact.items():
        assert value > 0
        assert abs(estimate.trace[name] - value) <= 0.05 * value, (name, estimate.trace[name], value)
        assert estimate.probes[name] >= 8 and math.isfinite(estimate.stderr[name])


def test_all_at_once_hessian_vector_products_agree_with_the_exact_ones(mlp_workload):
    """The parameter-space estimator (the default for label losses) on the same model."""
    exact = exact_traces(mlp_workload)
    estimate = hessian_traces(mlp_workload, estimator="hvp", max_probes=200)
    assert estimate.estimator == "hvp"
    for name, value in exact.items():
        assert abs(estimate.trace[name] - value) <= 0.05 * value, (name, estimate.trace[name], value)


def test_the_default_estimator_is_gauss_newton_for_every_loss(mlp_workload):
    """Zero residual (distillation): the Hessian itself. A label loss: its Gauss–Newton (Fisher)
    part, positive semi-definite, where the exact Hessian's per-layer traces came out negative and
    unsettled on a LLaMA-style model (hvp stays available)."""
    assert resolve_estimator(mlp_workload) == "gn"
    causal = mlp_workload.spec.with_overrides(loss={"kind": "causal-lm"})

    class Labelled:
        spec = causal

    assert resolve_estimator(Labelled()) == "gn"
    assert resolve_estimator(Labelled(), "hvp") == "hvp"


def test_the_specs_sensitivity_section_bounds_the_probes_and_analyze_can_override_it(mlp_workload):
    """[sensitivity] max_probes and tol are the profile's defaults (what a search computes), and
    its key: a tolerance no trace can reach stops every layer at the limit."""
    from mpsearch.sensitivity.analyze import analyze

    bounded = Workload(mlp_workload.spec.with_overrides(sensitivity={"max_probes": 9, "tol": 1e-9}), device="cpu")
    profile = analyze(bounded, "hessian", None)
    assert profile.params["max_probes"] == 9 and profile.params["tol"] == 1e-9
    assert all(row["probes"] == 9 for row in profile.layers), [row["probes"] for row in profile.layers]
    loose = analyze(bounded, "hessian", None, tol=0.5, max_probes=30)  # analyze's --tol / --max-probes win
    assert loose.params["max_probes"] == 30 and all(8 <= row["probes"] < 30 for row in loose.layers), [row["probes"] for row in loose.layers]
    assert analyze(mlp_workload, "hessian", None, tol=0.5).params["max_probes"] == 48  # the default


def test_a_label_loss_flags_unusable_traces_and_keeps_them_out_of_the_warm_starts(tiny_gpt2_dir):
    """hvp on a causal LM's cross-entropy: traces that end below zero or still moving at the probe
    limit are flagged in the profile; the search then leaves that profile's warm start out."""
    from mpsearch.search.driver import warm_start_scores
    from mpsearch.sensitivity.analyze import analyze
    from mpsearch.spec import Spec
    from mpsearch.workload import Workload

    spec = Spec.from_toml(f'[model]\nsource = "hf:{tiny_gpt2_dir}"\n[loss]\nkind = "causal-lm"\n[data]\ncalibration = 8\nevaluation = 4\nmax_length = 32\n[quant]\nbits = [4, 8]')
    workload = Workload(spec, device="cpu")
    hvp = analyze(workload, "hessian", None, estimator="hvp", max_probes=8)
    flagged = {row["name"]: row["flags"] for row in hvp.layers if row["flags"]}
    assert flagged and all(set(f) <= {"negative", "probe-limit"} for f in flagged.values())
    assert all(("negative" in row["flags"]) == (row["trace"] < 0) for row in hvp.layers)
    gn = analyze(workload, "hessian", None)
    assert gn.params["estimator"] == "gn" and all(row["trace"] >= 0 for row in gn.layers)
    assert set(warm_start_scores({"hessian": hvp, "perturbation": gn})) == {"perturbation"}
    assert set(warm_start_scores({"hessian": hvp}, use_flagged=True)) == {"hessian"}


@pytest.mark.parametrize("kind", ["kl", "cosine", "mse"])
def test_output_directions_have_the_loss_hessian_as_covariance(kind):
    """E[uuᵀ] = H_out, checked by autograd's Hessian of the loss in the output at out = ref."""
    from mpsearch.workload.losses import Outputs, make_loss

    torch.manual_seed(0)
    value = torch.randn(2, 3, 5, dtype=torch.float64)  # (examples, tokens, features)
    batch = {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    out_kind = "logits" if kind == "kl" else "hidden" if kind == "cosine" else "tensor"
    ref = Outputs(value.clone(), out_kind)
    loss = make_loss(kind)

    def total(x):
        return loss(Outputs(x, out_kind), ref, batch)[0]

    h = torch.autograd.functional.hessian(total, value).reshape(value.numel(), value.numel())
    generator = torch.Generator().manual_seed(1)
    draws = 10000
    cov = torch.zeros_like(h)
    for _ in range(draws):
        x = value.clone().requires_grad_(True)
        (u,) = torch.autograd.grad(loss.direction(Outputs(x, out_kind), batch, generator), x)
        u = u.reshape(-1).double()
        cov += torch.outer(u, u)
    cov /= draws
    assert torch.allclose(cov, h, atol=0.05 * float(h.abs().max())), float((cov - h).abs().max() / h.abs().max())


def test_per_layer_mode_and_the_total_trace_agree_with_the_exact_ones(mlp_workload):
    exact = exact_traces(mlp_workload)
    per_layer = hessian_traces(mlp_workload, mode="per-layer")
    for name, value in exact.items():
        assert abs(per_layer.trace[name] - value) <= 0.05 * value, (name, per_layer.trace[name], value)
    total, stderr, probes = total_trace(mlp_workload)
    assert abs(total - sum(exact.values())) <= 0.05 * sum(exact.values())


def test_the_fisher_diagonal_sums_to_the_gauss_newton_trace(mlp_workload):
    """At the FP weights the residual is zero, so Σ F_l estimates the same Tr(H_ll)."""
    exact = exact_traces(mlp_workload)
    fisher = fisher_diagonal(mlp_workload, samples=32)
    for name, value in exact.items():
        assert abs(float(fisher[name].sum()) - value) <= 0.05 * value, (name, float(fisher[name].sum()), value)


def test_minilm_traces_are_finite_non_negative_and_zero_where_the_loss_does_not_look(minilm_spec):
    searched = minilm_spec.with_overrides(layers={**minilm_spec.layers.model_dump(), "unseen": "search"})  # the pooler stays in the table
    traces = hessian_traces(Workload(searched, device="cpu"), tol=0.1, max_probes=16)
    for name, value in traces.trace.items():
        assert math.isfinite(value) and math.isfinite(traces.stderr[name]), name
        assert value >= -2 * traces.stderr[name], (name, value, traces.stderr[name])
    # The mean-pooled cosine loss never reads the pooler: its Hessian block is exactly zero.
    assert traces.trace["pooler.dense"] == 0.0 and traces.stderr["pooler.dense"] == 0.0
    assert min(v for k, v in traces.trace.items() if k != "pooler.dense") > 0
