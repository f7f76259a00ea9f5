"""Deployment configs written beside an export: llama.cpp tensor types, an HF-style config, a README.

* ``llama_cpp_tensor_types.txt`` is a ``--tensor-type-file`` for ``llama-quantize``: one
  ``regex=type`` line per group of layers that share a GGUF tensor role and a type, for
  example ``^blk\\.(0|3)\\.attn_q\\.weight$=q4_K``. llama.cpp reads nothing but such lines (it
  has no comment syntax), so layers with no GGUF name (say, a BERT pooler) are left to
  ``llama-quantize``'s base type and listed in ``README.md`` instead. Types are written with
  ggml's own names (``q2_K``, ``q3_K``, ``q4_K``, ``q8_0``, ``f16``), which every
  llama-quantize build accepts, case-sensitive or not.
* ``quantization_config.json`` describes the plan per module in the shape Hugging Face
  quantization configs take (``bits``, ``group_size``, ``sym``, ``modules_to_not_convert``,
  and a per-module ``dynamic`` override keyed ``+:^name$``, as GPTQModel reads it). The
  tensors themselves are in mpsearch's packing (``FORMAT.md``), which no HF integration
  reads: the config is for tools that take the plan, not the file.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from mpsearch.export.document import PlanDocument
from mpsearch.quant.gguf import gguf_tensor

GGUF_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 8: "q8_0", 16: "f16"}

# ggml's names for the dtypes a tensor the plan leaves alone is kept in.
GGML_FLOAT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def llama_cpp_tensor_types(doc: PlanDocument, unplanned: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """The ``--tensor-type-file`` text, and the layers it could not name.

    ``unplanned`` maps each weight the plan leaves alone (an excluded ``lm_head``, the token
    embeddings) to the dtype the export keeps it in; those get a line too, at that dtype, so
    llama-quantize does not quantize them to its base type.
    """
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)  # (role, type) -> block numbers
    singles: list[tuple[str, str]] = []
    unnamed = []
    wanted = [(layer.name, GGUF_TYPES[choice.bits]) for layer, choice in doc.entries()]
    wanted += [(name, GGML_FLOAT[dtype]) for name, dtype in (unplanned or {}).items()]
    for name, kind in wanted:
        tensor = gguf_tensor(name)
        if tensor is None:
            unnamed.append(name)
        elif tensor.startswith("blk."):
            _, block, role = tensor.split(".", 2)
            groups[(role, kind)].append(block)
        else:
            singles.append((tensor, kind))
    lines = []
    for (role, kind), blocks in sorted(groups.items(), key=lambda kv: (kv[0][0], int(kv[1][0]))):
        numbers = sorted(set(blocks), key=int)
        which = numbers[0] if len(numbers) == 1 else "(" + "|".join(numbers) + ")"
        lines.append(rf"^blk\.{which}\.{role}\.weight$={kind}")
    lines += [rf"^{re.escape(tensor)}\.weight$={kind}" for tensor, kind in singles]
    return "".join(line + "\n" for line in lines), unnamed


def quantization_config(doc: PlanDocument, unplanned: dict[str, str] | None = None) -> dict:
    """A Hugging Face-style per-module quantization config of the plan; ``unplanned`` (module ->
    dtype) are the weights the plan leaves alone, not converted and stated with their dtype."""
    unplanned = unplanned or {}
    plan = doc.plan
    quantized = [name for name in plan if plan[name].bits != 16]
    scheme = doc.provenance.scheme
    default_bits = Counter(plan[name].bits for name in quantized).most_common(1)[0][0] if quantized else 16
    dynamic = {}
    for name in quantized:
        c = plan[name]
        if c.bits != default_bits or c.group_size != scheme.get("group_size"):
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": c.bits, "group_size": c.group_size}
    return {
        "quant_method": "mpsearch",
        "format": "mpsearch-packed",
        "format_version": doc.format_version,
        "bits": default_bits,
        "group_size": scheme.get("group_size"),
        "sym": scheme.get("symmetric"),
        "desc_act": False,  # act_order only changes the order GPTQ visits columns; codes stay in column order
        "method": scheme.get("method"),
        "scale_dtype": scheme.get("scale_dtype"),
        "modules_to_not_convert": [name for name in plan if plan[name].bits == 16] + sorted(unplanned),
        "dynamic": dynamic,
        "modules": {name: {"bits": c.bits, "group_size": c.group_size, "sym": c.symmetric, "method": c.method} for name, c in plan.layers.items()},
        "unquantized": dict(sorted(unplanned.items())),  # module -> the dtype its weight keeps
    }


def readme(doc: PlanDocument, baselines: dict[str, dict], unnamed: list[str]) -> str:
    """The export's short README: what it is, how it compares, and every layer's bits."""
    lines = [
        readme_summary(doc, baselines),
        "Files: `model.safetensors` (packed weights, see `FORMAT.md`), `plan.json` (the plan and its provenance),",
        "`quantization_config.json` (per-module config), `llama_cpp_tensor_types.txt`",
        "(`llama-quantize --tensor-type-file llama_cpp_tensor_types.txt MODEL-F16.gguf OUT.gguf q4_K`).",
    ]
    if unnamed:
        lines.append("Layers with no GGUF tensor name, left to llama-quantize's base type: " + ", ".join(f"`{n}`" for n in unnamed) + ".")
    lines += [
        "",
        "Load it with `mpsearch.load_quantized(DIR)`; score it with `mpsearch eval DIR SPEC`.",
        "",
        "| layer | bits | group | method | bytes |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| `{layer.name}` | {c.bits} | {c.group_size or '-'} | {c.method} | {layer.bytes:,} |" for layer, c in doc.entries()]
    return "\n".join(lines) + "\n"


def readme_summary(doc: PlanDocument, baselines: dict[str, dict]) -> str:
    """The README's opening: what the export is, and its loss and size beside the study's baselines."""
    p, t = doc.provenance, doc.totals
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    lines = [
        f"# {p.study}, trial {p.trial}",
        "",
        f"A mixed-precision plan for `{p.model.source}` ({p.model.architecture}), exported by mpsearch {p.mpsearch_version}.",
        f"Loss ({p.loss_kind}) {p.loss:.6g} at {t.bytes:,} bytes ({mib(t.bytes)}), {t.bpw:.4f} bits per weight"
        + (f", within a budget of {p.budget_bytes:,} bytes." if p.budget_bytes else "."),
        "",
        "| plan | loss | bytes | bpw |",
        "|---|---|---|---|",
        f"| **this export** ({p.trial_source or 'sampled'}) | {p.loss:.6g} | {t.bytes:,} | {t.bpw:.4f} |",
    ]
    for name, row in sorted(baselines.items(), key=lambda kv: kv[1]["loss"]):
        lines.append(f"| {name} | {row['loss']:.6g} | {row['bytes']:,} | {row['bpw']:.4f} |")
    counts = Counter(c.type or c.bits for c in doc.plan.layers.values())
    per = "Layers per type: " if any(c.type for c in doc.plan.layers.values()) else "Layers per bit-width: "
    lines += ["", per + ", ".join(f"{b}{'' if isinstance(b, str) else ' bits'}: {counts[b]}" for b in sorted(counts, key=str)) + ".", ""]
    return "\n".join(lines)
