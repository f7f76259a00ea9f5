"""llama.cpp's own tensor types as the candidates of a search (``[target] format = "gguf"``).

With this target the bank's candidates are exactly what llama.cpp deploys: each layer is quantized
by ``llama-quantize`` itself (from an F32 GGUF that ``convert_hf_to_gguf.py`` makes of the
model), read back block for block with the ``gguf`` package, and decoded with its dequantizers
for the trials. A layer's bytes are its GGUF tensor's bytes. The export writes one ``.gguf`` with
the plan's type per tensor (:mod:`mpsearch.export.targets.gguf`).

A plan's ``bits`` stay a level of one menu, shared by every layer, and each level is one llama.cpp
type. Which types a tensor can take depends on its row length (its input dimension): K-quants
need rows that are a multiple of 256, the 32-element block types a multiple of 32.

=====  ======================  ==========================
bits   rows % 256 == 0          rows % 32 == 0 only
=====  ======================  ==========================
2      Q2_K (2.625 bpw)         —
3      Q3_K (3.4375)            —
4      Q4_K (4.5)               IQ4_NL (4.5)
5      Q5_K (5.5)               Q5_0 (5.5)
6      Q6_K (6.5625)            —
8      Q8_0 (8.5)               Q8_0 (8.5)
16     F16                      F16
=====  ======================  ==========================

A level a tensor cannot take stands for the next level up that it can (:func:`effective_level`),
so a plan of "all 2-bit" puts a layer with rows of 384 at IQ4_NL. IQ4_NL, not Q4_0, for the
32-row tensors: same bytes, and llama.cpp's own measurement on MiniLM (cosine 0.978 against
0.966) favours it.

>>> layer_types(1536, (2, 3, 4, 5, 6, 8, 16))[2], layer_types(384, (2, 4, 8, 16))
('Q2_K', {4: 'IQ4_NL', 8: 'Q8_0', 16: 'F16'})
>>> effective_level(layer_types(384, (2, 4, 8, 16)), 2)
4
>>> type_bytes("Q4_K", rows=384, cols=1536)  # 6 blocks of 256 per row, 144 bytes each
331776
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from mpsearch.errors import MPSearchError

log = logging.getLogger(__name__)

GGUF_LEVELS = (2, 3, 4, 5, 6, 8, 16)
"""The levels of the gguf target's menu (its default ``quant.bits``)."""

K_TYPES = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0", 16: "F16"}
BLOCK32_TYPES = {4: "IQ4_NL", 5: "Q5_0", 8: "Q8_0", 16: "F16"}
FLOAT_TYPES = {16: "F16"}

# The block index and the module path inside a block, for the usual transformer layouts.
_BLOCK = re.compile(r"^(?:.*\.)?(?:layers|layer|h|blocks|block)\.(\d+)\.(.+)$")

# Module path inside a block → GGUF tensor role (llama.cpp's names: blk.N.<role>.weight).
_ROLES = {
    # LLaMA, Mistral, Qwen, Gemma
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # BERT and its kin
    "attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output", "intermediate.dense": "ffn_up", "output.dense": "ffn_down",
    # GPT-2
    "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
# Whole-model tensors.
_TOP = {
    "lm_head": "output", "embed_out": "output",
    "model.embed_tokens": "token_embd", "transformer.wte": "token_embd", "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd", "transformer.wpe": "position_embd",
    "embeddings.token_type_embeddings": "token_types",
}
NO_TENSOR_RULE = "llama.cpp's converter writes no tensor for it (it has no GGUF name), so the gguf target cannot quantize it; it stays at the model's dtype"


def gguf_tensor(name: str) -> str | None:
    """The GGUF tensor a module's weight becomes, or None where llama.cpp has no known name.

    >>> gguf_tensor("encoder.layer.3.attention.self.query"), gguf_tensor("transformer.h.0.mlp.c_fc")
    ('blk.3.attn_q', 'blk.0.ffn_up')
    >>> gguf_tensor("pooler.dense") is None
    True
    """
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in _ROLES:
        return f"blk.{m.group(1)}.{_ROLES[m.group(2)]}"
    return None


def layer_types(cols: int, menu: tuple[int, ...]) -> dict[int, str]:
    """``{level: llama.cpp type}`` a tensor with rows of ``cols`` can take, within ``menu``."""
    family = K_TYPES if cols % 256 == 0 else BLOCK32_TYPES if cols % 32 == 0 else FLOAT_TYPES
    return {b: t for b, t in family.items() if b in menu}


def effective_level(types: Mapping[int, str], bits: int) -> int:
    """The level a tensor with ``types`` takes for ``bits``: ``bits`` itself, or the next it can."""
    if bits in types:
        return bits
    higher = [b for b in types if b > bits]
    return min(higher) if higher else max(types)


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def type_bytes(type_name: str, rows: int, cols: int) -> int:
    """Exact bytes of a ``rows`` × ``cols`` tensor of ``type_name`` in a GGUF file."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[_qtype(type_name)]
    if cols % block:
        raise MPSearchError(f"a {type_name} tensor needs rows that are a multiple of {block}, not {cols}")
    return rows * (cols // block) * size


def dequantize(blocks: torch.Tensor, type_name: str, rows: int, cols: int) -> torch.Tensor:
    """The float32 (rows × cols) matrix that ``blocks`` (a GGUF tensor's raw bytes) decode to,
    with the ``gguf`` package's dequantizer for ``type_name``, on ``blocks``'s device."""
    from gguf import quants

    raw = blocks.detach().cpu().numpy().reshape(rows, -1)
    values = quants.dequantize(raw, _qtype(type_name)).reshape(rows, cols)
    return torch.from_numpy(values.astype("float32", copy=False)).to(blocks.device)


def build_candidates(
    model_dir: Path, table, model_weights: Mapping[str, torch.Tensor], levels: tuple[int, ...], progress: bool = False,
    imatrix: tuple[str, int, Path] | None = None,
) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Every layer of ``table`` at each of ``levels``, quantized by llama.cpp: ``{level: {layer: form}}``.

    ``model_dir`` (a Hugging Face folder) is converted once to an F32 GGUF, whose tensor for each
    layer must hold the layer's weight (``model_weights``: the (rows × cols) FP matrices), row for
    row, in the model's order or another (:func:`row_orders`); ``llama-quantize --pure`` then
    writes, for each type the levels need, the layers planned at that type (every other matrix
    is named at its converted type, so it is copied, not quantized), and each layer's tensor is
    read back, its rows put in the model's order. A form is ``{"blocks": uint8 (rows × bytes
    per row)}``, or ``{"weight": fp16}`` at F16 (llama.cpp's F16 is the plain cast).

    ``imatrix`` = (calibration text, context length, path): llama-imatrix measures the importance
    matrix of the F32 GGUF on the text into ``path`` (unless it is there already), and every
    llama-quantize run weighs its rounding by it.
    """
    from tqdm.auto import tqdm

    from mpsearch.quant import llama_cpp
    from mpsearch.quant.gguf_file import read_gguf

    llama = llama_cpp.tools()
    forms: dict[int, dict[str, dict[str, torch.Tensor]]] = {b: {} for b in levels}
    wanted: dict[str, list[tuple[str, int]]] = {}  # type -> [(layer, level)]
    for layer in table.layers:
        for b in levels:
            if table.layer_level(layer.name, b) != b:
                continue
            t = table.type_of(layer.name, b)
            if t == "F16":
                forms[b][layer.name] = {"weight": model_weights[layer.name].to(torch.float16).contiguous()}
            else:
                wanted.setdefault(t, []).append((layer.name, b))
    if not wanted:
        return forms
    with tempfile.TemporaryDirectory(prefix="mpsearch-gguf-") as tmp:
        base = llama.convert(model_dir, Path(tmp) / "model-f32.gguf", outtype="f32")
        converted = read_gguf(base).tensors
        orders = row_orders(converted, table, model_weights)
        as_converted = llama_cpp.matrix_types(converted)
        importance = None
        if imatrix is not None:
            text, n_ctx, importance = imatrix
            if not importance.is_file():
                llama_cpp.imatrix(llama, base, text, n_ctx, importance)
        bar = tqdm(total=len(wanted), desc="quantizing (llama.cpp)", unit="type", disable=not progress, leave=False)
        for type_name, members in wanted.items():
            out = Path(tmp) / f"model-{type_name}.gguf"
            # Only this type's layers are quantized: every other matrix is named at its converted type.
            own = {f"{gguf_tensor(name)}.weight" for name, _ in members}
            others = llama_cpp.write_tensor_types(Path(tmp) / f"others-{type_name}.txt", {n: k for n, k in as_converted.items() if n not in own})
            llama_cpp.quantize(llama, base, out, type_name, others, imatrix=importance, pure=True)
            tensors = read_gguf(out).tensors
            for name, b in members:
                tensor = tensors[f"{gguf_tensor(name)}.weight"]
                if tensor.tensor_type.name != type_name:
                    raise MPSearchError(f"llama-quantize wrote {name!r} as {tensor.tensor_type.name}, not {type_name}; this llama.cpp does not take that type there")
                blocks = torch.from_numpy(tensor.data.copy()).reshape(table.layer(name).rows, -1)
                order = orders[name]
                forms[b][name] = {"blocks": blocks if order is None else blocks[order].contiguous()}
            out.unlink()
            bar.update()
        bar.close()
    return forms


def row_orders(tensors: Mapping, table, model_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """For each layer, where the F32 GGUF keeps each of the model's rows: None when in the same
    order, else ``order`` with ``gguf_rows[order] == model_rows``.

    llama.cpp's converter reorders the rows of LLaMA's q and k projections (for its rope layout).
    Every llama.cpp type quantizes a row on its own (blocks run along the row), so a candidate is
    the same whichever order the rows are in: the bank keeps the model's, and an export compares
    its blocks through the order. Anything but a reordering of the very rows is refused.
    """
    orders = {}
    for layer in table.layers:
        key = f"{gguf_tensor(layer.name)}.weight"
        tensor = tensors.get(key)
        if tensor is None:
            raise MPSearchError(f"the converted GGUF has no tensor {key} for layer {layer.name!r}; exclude it with layers.exclude")
        stored = torch.from_numpy(tensor.data.astype("float32")).reshape(layer.rows, layer.cols)
        ours = model_weights[layer.name].cpu().to(torch.float32)
        if torch.equal(stored, ours):
            orders[layer.name] = None
            continue
        where = {row.numpy().tobytes(): i for i, row in enumerate(stored)}
        order = [where.get(row.numpy().tobytes()) for row in ours]
        if None in order or len(set(order)) != layer.rows:
            raise MPSearchError(
                f"llama.cpp's converter changes the values of layer {layer.name!r} ({key}), not only their order; "
                "the gguf target does not support this architecture yet: use target.format = \"mpsearch\""
            )
        orders[layer.name] = torch.tensor(order, dtype=torch.int64)
    return orders
