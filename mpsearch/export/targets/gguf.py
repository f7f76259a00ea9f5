"""The gguf target's export: one ``model.gguf`` that llama.cpp runs, holding the searched tensors.

A study with ``[target] format = "gguf"`` searched over llama.cpp's own types
(:mod:`mpsearch.quant.gguf`). Its export:

1. converts the model to an F32 GGUF with the ``convert_hf_to_gguf.py`` of mpsearch's llama.cpp;
2. states every weight matrix's type in a tensor-type file (``llama_cpp_tensor_types.txt``, one
   exact ``^name$=type`` line per tensor): each planned layer at its plan's type, every other
   matrix (embeddings, excluded layers) at the type the converter gave it (F32), and runs
   ``llama-quantize --tensor-type-file`` with base type Q8_0 (a float base type would make
   llama-quantize ignore the file; with every matrix stated, the base type applies to none);
3. reads the file back with the ``gguf`` package: each tensor's written type must be its stated
   one, its bytes the plan's, and each planned tensor's blocks byte-identical to the candidate the
   search evaluated, so what was searched is what is deployed. With ``target.imatrix`` step 2
   quantizes with the importance matrix the candidates were made with, shipped as ``imatrix.gguf``;
4. with verification on, runs llama.cpp on the evaluation texts and compares it with mpsearch's
   own forward pass of the same plan: for an encoder ``llama-embedding``'s embeddings (mean
   cosine at least :data:`MIN_MEAN_COSINE`), for a causal LM ``llama-perplexity`` (within
   :data:`MAX_PPL_GAP`, mpsearch's computed llama.cpp's way on the same tokens).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mpsearch.export.loader import ExportError
from mpsearch.plan import Plan
from mpsearch.quant.gguf import gguf_tensor, row_orders
from mpsearch.quant.gguf_file import read_gguf
from mpsearch.quant.layers import weight_matrix

FILE = "model.gguf"
TYPES_FILE = "llama_cpp_tensor_types.txt"
IMATRIX_FILE = "imatrix.gguf"  # target.imatrix: the importance matrix the candidates and the file were quantized with
MIN_MEAN_COSINE = 0.999
MAX_PPL_GAP = 0.01
MAX_TOKENS = 512  # llama-embedding runs with a context of 512; mpsearch's side truncates there too


@dataclass
class GgufReport:
    """What the export wrote and what llama.cpp said of it."""

    tensors: list[dict]  # per planned layer: layer, tensor, planned, written, bytes
    stated: dict[str, str]  # every other weight matrix: tensor -> its written type
    tensor_bytes: int  # all tensors of the file
    embedding: dict | None = None  # llama-embedding against mpsearch: mean and min cosine, texts
    perplexity: dict | None = None  # llama-perplexity against mpsearch's: both, their gap, n_ctx, tokens

    def to_json(self) -> dict:
        return {
            "file": FILE, "tensors": self.tensors, "stated": self.stated, "tensor_bytes": self.tensor_bytes,
            "embedding": self.embedding, "perplexity": self.perplexity,
        }


def write(folder: Path, workload, plan: Plan, bank) -> GgufReport:
    """``folder/model.gguf`` and its tensor-type file, checked (steps 1–3 of the module docstring)."""
    from mpsearch.quant import llama_cpp

    table = workload.layer_table()
    llama = llama_cpp.tools()
    planned = {f"{gguf_tensor(layer.name)}.weight": (layer, table.type_of(layer.name, plan[layer.name].bits)) for layer in table.layers}
    with tempfile.TemporaryDirectory(prefix="mpsearch-gguf-export-") as tmp:
        base = llama.convert(workload.source_dir(), Path(tmp) / "model-f32.gguf", outtype="f32")
        converted = read_gguf(base).tensors
        modules = dict(workload.fp_model().named_modules())
        orders = row_orders(converted, table, {layer.name: weight_matrix(modules[layer.name]).detach() for layer in table.layers})
        # Every matrix named: the planned ones at their types, the others as they were converted.
        wanted = {**llama_cpp.matrix_types(converted), **{name: planned[name][1] for name in planned if name in converted}}
        absent = [name for name in planned if name not in wanted]
        if absent:
            raise ExportError(f"the converted GGUF has no tensor {absent[0]}; the study ran with another converter")
        types_file = llama_cpp.write_tensor_types(folder / TYPES_FILE, wanted)
        llama_cpp.quantize(llama, base, folder / FILE, "q8_0", types_file, imatrix=bank.imatrix)  # the candidates' own matrix
    if bank.imatrix is not None:  # shipped: with it and the tensor-type file, llama-quantize makes this file again
        shutil.copyfile(bank.imatrix, folder / IMATRIX_FILE)
    written = read_gguf(folder / FILE).tensors
    rows, stated = [], {}
    for name, kind in wanted.items():
        t = written.get(name)
        got = t.tensor_type.name if t is not None else None
        if got != kind:
            raise ExportError(f"llama-quantize wrote {name} as {got}, not the stated {kind}; nothing was written")
        if name not in planned:
            stated[name] = got
            continue
        layer, _ = planned[name]
        bits = plan[layer.name].bits
        if int(t.n_bytes) != table.layer_bytes(layer.name, bits):
            raise ExportError(f"{name} takes {int(t.n_bytes)} bytes in the GGUF, the plan counted {table.layer_bytes(layer.name, bits)}")
        if not _same_blocks(t, bank.candidate(layer.name, bits), orders[layer.name], layer.rows):
            raise ExportError(f"llama-quantize wrote other {kind} blocks for {name} than the search evaluated; nothing was written")
        rows.append({"layer": layer.name, "tensor": name, "planned": kind, "written": got, "bytes": int(t.n_bytes)})
    return GgufReport(tensors=rows, stated=stated, tensor_bytes=sum(int(t.n_bytes) for t in written.values()))


def _same_blocks(tensor, candidate, order, rows: int) -> bool:
    """Whether the file's tensor is the candidate, row for row (through the converter's row order)."""
    import numpy as np

    data = np.asarray(tensor.data).reshape(rows, -1)
    if order is not None:
        data = data[order.numpy()]
    if "blocks" in candidate.packed:
        return np.array_equal(data.view(np.uint8), candidate.packed["blocks"].cpu().numpy())
    ours = candidate.packed["weight"].cpu().numpy()  # F16: the plain cast
    return np.array_equal(data.reshape(ours.shape), ours)


def check_embeddings(path: Path, workload, plan: Plan, bank, texts: list[str]) -> dict:
    """llama-embedding's embeddings of ``texts`` against mpsearch's forward pass of the same plan
    (mean-pooled, L2-normalised): their mean and least cosine. Raises when the mean is below
    :data:`MIN_MEAN_COSINE`."""
    from mpsearch.quant import llama_cpp

    texts = [t for t in texts if "\n" not in t]
    theirs = torch.from_numpy(llama_cpp.embed(llama_cpp.tools(), path, texts)).to(torch.float64)
    model = workload.fp_model()
    with bank.applied(model, plan):
        ours = mean_pooled(model, workload.loaded.tokenizer, texts, workload.device).to(torch.float64)
    cos = (theirs * ours).sum(dim=1) / (theirs.norm(dim=1) * ours.norm(dim=1))
    result = {"mean": float(cos.mean()), "min": float(cos.min()), "texts": len(texts)}
    if result["mean"] < MIN_MEAN_COSINE:
        raise ExportError(
            f"llama.cpp's embeddings of the export agree with mpsearch's evaluation to a mean cosine of {result['mean']:.5f} "
            f"(needed {MIN_MEAN_COSINE}): llama.cpp does not run what was searched; nothing was written (--no-verify writes it unchecked)"
        )
    return result


def check_perplexity(path: Path, workload, plan: Plan, bank, texts: list[str]) -> dict:
    """llama-perplexity on the evaluation texts (joined by blank lines) against mpsearch's forward
    pass of the same plan, computed llama.cpp's way (:func:`chunked_perplexity`) on the same
    tokens. Raises when they differ by more than :data:`MAX_PPL_GAP` (relative)."""
    from mpsearch.quant import llama_cpp

    text = "\n\n".join(texts)
    n_ctx = min(workload.spec.data.max_length, 512)
    theirs = llama_cpp.perplexity(llama_cpp.tools(), path, text, n_ctx)
    fields = read_gguf(path).fields
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    bos = int(fields.get("tokenizer.ggml.bos_token_id", 0))
    tokens = workload.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    model = workload.fp_model()
    with bank.applied(model, plan):
        ours = chunked_perplexity(model, ([bos] if add_bos else []) + list(tokens), n_ctx, bos if add_bos else None, workload.device)
    result = {"llama_cpp": theirs, "mpsearch": ours, "gap": abs(theirs / ours - 1), "n_ctx": n_ctx, "tokens": len(tokens)}
    if result["gap"] > MAX_PPL_GAP:
        raise ExportError(
            f"llama-perplexity of the export is {theirs:.4f} and mpsearch's of the same plan {ours:.4f} "
            f"({result['gap']:.2%} apart, allowed {MAX_PPL_GAP:.0%}): llama.cpp does not run what was searched; nothing was written (--no-verify writes it unchecked)"
        )
    return result


@torch.no_grad()
def chunked_perplexity(model, tokens: list[int], n_ctx: int, bos: int | None, device) -> float:
    """Perplexity the way llama-perplexity computes it: consecutive chunks of ``n_ctx`` tokens,
    each chunk's first token replaced by ``bos`` (when the vocabulary adds one), and only the
    second half of each chunk scored (token ``j + 1`` from the logits at ``j``, ``j ≥ n_ctx/2``)."""
    first, nll, count = n_ctx // 2, 0.0, 0
    for start in range(0, len(tokens) // n_ctx * n_ctx, n_ctx):
        chunk = torch.tensor(tokens[start : start + n_ctx], device=device)
        if bos is not None:
            chunk[0] = bos
        logits = model(input_ids=chunk[None]).logits[0].to(torch.float64)
        logp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
        nll -= float(logp.gather(1, chunk[first + 1 :, None]).sum())
        count += n_ctx - 1 - first
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], device, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised mean-pooled last hidden states of ``texts`` (one row each), on the CPU."""
    rows = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(rows)


def readme_section(report: GgufReport, doc) -> str:
    """The export README's part on the GGUF: how to run it, and each tensor's planned and written type."""
    lines = [
        "",
        "## The GGUF (target gguf)",
        "",
        f"`{FILE}` is the plan in llama.cpp's own types, byte for byte the tensors the search evaluated. "
        "Run it with llama.cpp (`mpsearch toolchain llama.cpp --json` prints where its tools are), for example:",
        "",
        "```",
        f"llama-embedding -m {FILE} --pooling mean --embd-normalize 2 --no-escape -f texts.txt",
        "```",
        "",
        "Every weight matrix's type is stated in `llama_cpp_tensor_types.txt`, and the file was read back: each written type is the stated one.",
        "`plan.json` holds the plan with each layer's llama.cpp `type` and the provenance.",
    ]
    if report.embedding is not None:
        e = report.embedding
        lines += ["", f"Checked: llama-embedding against mpsearch's evaluation of the same plan on {e['texts']} evaluation texts, mean cosine {e['mean']:.6f}, least {e['min']:.6f}."]
    if report.perplexity is not None:
        p = report.perplexity
        lines += ["", f"Checked: llama-perplexity {p['llama_cpp']:.4f} against mpsearch's {p['mpsearch']:.4f} for the same plan ({p['gap']:.2%} apart) "
                  f"on the evaluation texts ({p['tokens']} tokens, chunks of {p['n_ctx']})."]
    lines += ["", "| tensor | layer | planned | written | bytes |", "|---|---|---|---|---|"]
    lines += [f"| `{r['tensor']}` | `{r['layer']}` | {r['planned']} | {r['written']} | {r['bytes']:,} |" for r in report.tensors]
    if report.stated:
        lines += ["", "Other weight matrices, kept as converted: " + ", ".join(f"`{n}` {k}" for n, k in report.stated.items()) + "."]
    return "\n".join(lines) + "\n"
