"""On a GPU: the bank, the delta swap, the scorer and the Hessian traces give what the CPU gives.

Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mpsearch.runtime import Scorer
from mpsearch.sensitivity.hessian import hessian_traces
from mpsearch.spec import Spec
from mpsearch.workload import Workload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def spec(tmp_path_factory, factories_dir):
    folder = tmp_path_factory.mktemp("cuda")
    torch.manual_seed(1)
    save_file({"inputs": torch.randn(48, 64)}, str(folder / "x.safetensors"))
    return Spec.from_dict(
        {
            "model": {"source": "python:mpsearch_test_factories:mlp"},
            "data": {"source": str(folder / "x.safetensors"), "calibration": 16, "evaluation": 32, "batch_size": 8},
            "quant": {"group_size": 32, "method": "gptq"},
            "search": {"device": "cuda", "workers": 0},
        },
        base_dir=factories_dir,
    )


def test_a_scorer_on_cuda_scores_what_the_cpu_scores(spec):
    gpu, cpu = Scorer(spec, device="cuda"), Scorer(spec, device="cpu")
    table = Workload(spec, device="cpu").layer_table()
    plans = [table.uniform(b) for b in (2, 3, 4, 8, 16)] + [{"0": 2, "2": 8}, {"0": 8, "2": 2}]
    for plan in plans:  # one after another: delta swaps on the GPU
        assert gpu.score(plan) == pytest.approx(cpu.score(plan), rel=1e-3, abs=1e-6), plan
    workload, bank, model = gpu._loaded()
    assert bank.device.type == "cuda" and next(model.parameters()).device.type == "cuda"


def test_gauss_newton_traces_on_cuda_agree_with_the_cpu(spec):
    on_gpu = hessian_traces(Workload(spec, device="cuda"), tol=0.02, seed=0)
    on_cpu = hessian_traces(Workload(spec, device="cpu"), tol=0.02, seed=0)
    for name, value in on_cpu.trace.items():
        assert on_gpu.trace[name] == pytest.approx(value, rel=1e-3), name


def test_refinement_and_repair_run_on_cuda(spec):
    """Sequential GPTQ and repair on CUDA: the bank's layout, a finite loss, and repair steps that
    lower the training loss (on the CPU: 1.44e-4 to 1.20e-4 in 4 steps). Codes are not compared
    with the CPU's (GPTQ's float order differs between devices, and no GPU has measured by how
    much), nor is refinement expected to help on this 2-layer MLP: on the CPU it does not
    (0.00193 to 0.00206), which is why an export keeps it only when it does."""
    from mpsearch.quant.refine import sequential_forms
    from mpsearch.quant.repair import repair

    workload = Workload(spec, device="cuda")
    table = workload.layer_table()
    bits = dict(zip(table.names, (3, 4, 8, 16)))
    bank = workload.candidate_bank(sorted(set(bits.values())))
    model = workload.build_model()
    forms, methods = sequential_forms(model, table, bits, workload.calibration_batches(), workload.forward)
    for name, b in bits.items():
        cand = bank.candidate(name, b).packed
        assert {k: (t.shape, t.dtype) for k, t in forms[name].items()} == {k: (t.shape, t.dtype) for k, t in cand.items()}
        assert methods[name] == ("fp16" if b == 16 else "gptq")
    assert torch.isfinite(torch.tensor(workload.loss(model)))

    def step_loss(m, index):
        total, count = workload.loss_terms(m, "calibration", index)
        return total / count

    done = repair(workload.build_model(), table, bits, forms, step_loss, len(workload.calibration_batches()), steps=4)
    assert len(done.curve) == 4 and done.curve[-1] < done.curve[0]
