"""The gguf target's ledger, without llama.cpp: which llama.cpp type each layer takes at each level,
its exact GGUF bytes, and allocation over per-layer menus (tests/export/test_gguf_target.py runs
llama.cpp itself)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mpsearch.errors import MPSearchError, SpecError
from mpsearch.plan import LayerChoice, Plan
from mpsearch.quant.budget import Budget
from mpsearch.quant.gguf import GGUF_LEVELS, effective_level, layer_types, type_bytes
from mpsearch.search.allocate import Costs, greedy, ilp, is_maximal, repair
from mpsearch.spec import Spec
from mpsearch.workload import Workload

from conftest import tiny_spec_text


@pytest.fixture(scope="module")
def table():
    spec = Spec.from_toml(tiny_spec_text().replace("bits = [3, 8]", "bits = [2, 3, 4, 5, 6, 8, 16]") + '[target]\nformat = "gguf"\n')
    return Workload(spec, device="cpu").layer_table()


def gguf_bytes(kind: str, rows: int, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return rows * cols // block * size


def test_types_follow_the_row_length():
    assert layer_types(1536, GGUF_LEVELS) == {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0", 16: "F16"}
    assert layer_types(384, GGUF_LEVELS) == {4: "IQ4_NL", 5: "Q5_0", 8: "Q8_0", 16: "F16"}
    assert layer_types(100, GGUF_LEVELS) == {16: "F16"}
    assert layer_types(100, (2, 4)) == {}
    types = layer_types(384, GGUF_LEVELS)
    assert [effective_level(types, b) for b in GGUF_LEVELS] == [4, 4, 4, 5, 8, 8, 16]
    assert type_bytes("Q2_K", 384, 1536) == 384 * 6 * 84
    with pytest.raises(MPSearchError, match="multiple of 256"):
        type_bytes("Q4_K", 1536, 384)


def test_minilm_table_takes_llama_cpp_bytes(table):
    assert [e["name"] for e in table.excluded if "converter" in e["reason"]] == ["pooler.dense"]
    assert table.target == "gguf" and len(table.layers) == 36
    for layer in table.layers:
        for b in table.menu:
            kind = table.type_of(layer.name, b)
            expected = 2 * layer.n if kind == "F16" else gguf_bytes(kind, layer.rows, layer.cols)
            assert table.layer_bytes(layer.name, b) == expected
    down = "encoder.layer.0.output.dense"
    assert table.levels(down) == GGUF_LEVELS and table.type_of(down, 2) == "Q2_K"
    query = "encoder.layer.0.attention.self.query"
    assert table.levels(query) == (4, 5, 8, 16) and table.type_of(query, 2) == "IQ4_NL"
    smallest = table.uniform(2)
    assert smallest[query].bits == 4 and smallest[down].bits == 2
    downs = [layer for layer in table.layers if layer.cols == 1536]
    expected_bytes = sum(gguf_bytes("Q2_K", l.rows, l.cols) if l.cols == 1536 else gguf_bytes("IQ4_NL", l.rows, l.cols) for l in table.layers)
    assert len(downs) == 6 and table.quantized_bytes(smallest) == expected_bytes
    with pytest.raises(MPSearchError, match=r"gives 'encoder.layer.0.attention.self.query' 2 bits.*rows of 384.*\[4, 5, 8, 16\]"):
        table.check_plan(Plan.of_bits({**smallest.bits(), query: 2}))
    assert table.to_json()["layers"][0]["types"]["2"] == "IQ4_NL"


def test_allocators_hold_each_layer_to_its_own_types(table):
    rng = np.random.default_rng(0)
    scores = {n: {b: float(rng.uniform(0, 1)) / b for b in table.menu} for n in table.names}
    costs = Costs.of(table, scores)
    query = table.names.index("encoder.layer.0.attention.self.query")
    assert costs.nbytes[query, 0] == costs.nbytes[query, 2] and costs.cost[query, 0] == costs.cost[query, 2]  # 2 and 3 bits stand for IQ4_NL
    widths = len(table.menu)
    starts = [np.zeros(len(table.names), dtype=np.int64), np.full(len(table.names), widths - 1)] + [rng.integers(0, widths, len(table.names)) for _ in range(5)]
    for bpw in (3.9, 4.5, 5.0, 6.0):
        limit = table.budget_bytes(Budget.parse(f"{bpw}bpw"))
        # repair goes down (and up) over the widths that stand for another: from the top, a
        # 384-wide layer at Q8_0 (8 bits) steps to Q5_0, not to "6 bits", which is Q8_0 again
        for plan in (ilp(costs, limit), greedy(costs, limit), *(repair(costs, start, limit) for start in starts)):
            table.check_plan(plan)  # every layer at a level it can take
            assert table.bytes(plan) <= limit and costs.bytes_of(plan) == table.bytes(plan)
            assert costs.plan(costs.index(plan)) == plan
            assert is_maximal(costs, plan, limit)
    down, up = costs.steps
    assert list(down[query]) == [0, 1, 2, 2, 3, 3, 5] and list(up[query]) == [3, 3, 3, 4, 6, 6, 6]  # levels 2 3 4 5 6 8 16: IQ4_NL IQ4_NL IQ4_NL Q5_0 Q8_0 Q8_0 F16


def test_the_spec_names_the_target():
    gguf = Spec.from_toml('[target]\nformat = "gguf"\n')
    assert gguf.quant.bits == GGUF_LEVELS and gguf.digest() != Spec.from_toml("").digest()
    assert Spec.from_toml('[target]\nformat = "gguf"\n[quant]\nbits = [4, 5, 16]\n').quant.bits == (4, 5, 16)
    assert "target" not in Spec.from_toml("").keyed()  # studies made before the target keep their digests
    with pytest.raises(SpecError, match=r'quant.bits: 5 bits are llama.cpp\'s Q5 types: set target.format = "gguf"'):
        Spec.from_toml("[quant]\nbits = [4, 5]\n")
    with pytest.raises(SpecError, match="target.format"):
        Spec.from_toml('[target]\nformat = "exl2"\n')
    assert LayerChoice(bits=5, type="Q5_K").to_json() == {"bits": 5, "type": "Q5_K"}


def test_a_python_model_cannot_take_the_gguf_target(factories_dir):
    spec = Spec.from_toml('[model]\nsource = "python:factories:mlp"\n[target]\nformat = "gguf"\n', base_dir=factories_dir)
    with pytest.raises(MPSearchError, match="needs a model llama.cpp's converter can read"):
        Workload(spec, device="cpu").source_dir()
