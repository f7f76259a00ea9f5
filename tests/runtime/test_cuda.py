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
