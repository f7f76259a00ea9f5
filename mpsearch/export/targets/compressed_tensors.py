"""The ``compressed-tensors`` target: an export as a Hugging Face model folder that transformers loads.

``mpsearch export STUDY --out DIR --target compressed-tensors`` writes, beside the mpsearch
export, ``DIR/compressed-tensors/``: ``config.json`` with a compressed-tensors
``quantization_config``, ``model.safetensors`` in that library's ``pack-quantized`` layout, and
the tokenizer. ``AutoModel.from_pretrained`` reads it when the ``compressed-tensors`` package is
installed, and gives the outputs of mpsearch's own loader (checked before the folder is kept).

The codes are the very ones the trial evaluated; only their layout changes:

* mpsearch's symmetric grid ``ŵ = s·(q − 2**(b−1))`` with ``q ∈ [0, 2**b − 1]`` is
  compressed-tensors' signed grid ``ŵ = s·q'`` with ``q' = q − 2**(b−1)``; an asymmetric zero
  point ``z`` becomes ``z − 2**(b−1)`` the same way, so ``q' − z'`` is ``q − z`` exactly;
* a symmetric layer is ``pack-quantized``: ``weight_packed`` holds the signed codes densely
  packed into int32 (the library's own ``pack_to_int32``), ``weight_shape`` the matrix shape and
  ``weight_scale`` the scales;
* an asymmetric layer is ``naive-quantized`` (signed codes one per int8 ``weight``, with
  ``weight_scale`` and an int8 ``weight_zero_point``): with compressed-tensors 0.20.1 and
  transformers 5.24, a packed zero point is refused at load (transformers sizes the model's
  zero point unpacked, rows × groups, and the file's is packed along the rows), so packing
  asymmetric layers would give a folder that does not load;
* scales are written in the model's dtype. Decompression multiplies in the scale's dtype, so
  fp16 scales would round ``s·q'`` to fp16 where mpsearch computes it in float32: the model's
  dtype (float32 for MiniLM) keeps every weight identical, at 2 more bytes per group.

One config group per (bits, group size, symmetric) names its modules in ``targets``; every
other module is in ``ignore``. A planned layer compressed-tensors cannot pack is written dense
at its quantized values (so outputs still match) and listed with the reason:

* module types other than ``Linear`` and ``Embedding`` (GPT-2's ``Conv1D`` keeps its weight
  as (in, out), and compressed-tensors groups along the stored last dimension, the outputs);
* a group size that does not divide the row (compressed-tensors needs equal groups);
* 16-bit layers (written in fp16, which holds them exactly; transformers casts them to the
  model's dtype at load).

A study with ``[target] format = "compressed-tensors"`` counts every layer at its bytes in this
layout (:mod:`mpsearch.quant.ct_layout`) and leaves out the layers it cannot pack, so its export
is this folder alone, with ``plan.json`` and ``README.md``: its tensor bytes are bytes(plan).

vLLM runs compressed-tensors' WNA16 kernels at 4 and 8 bits only (symmetric, group size 32,
64, 128 or per-channel, on Linear layers); a plan with 2- or 3-bit layers loads in transformers
but not in vLLM. :func:`vllm_problems` names such layers; ``quant.bits = "vllm"`` (4, 8, 16) restricts
a study to widths vLLM runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mpsearch.errors import MPSearchError
from mpsearch.export.document import PlanDocument
from mpsearch.export.loader import ExportError
from mpsearch.plan import FLOAT_BITS
from mpsearch.quant import ct_layout
from mpsearch.quant.apply import module_layout
from mpsearch.quant.packing import unpack

FOLDER = "compressed-tensors"
CONFIG_FILE = "config.json"
VERIFY_RTOL = 1e-4
VLLM_BITS = frozenset({4, 8})
VLLM_GROUPS = frozenset({32, 64, 128})


@dataclass
class TargetReport:
    """What the compressed-tensors folder holds: quantized and dense layers, its bytes and the check."""

    folder: Path
    quantized: dict[str, str] = field(default_factory=dict)  # layer -> config group
    dense: dict[str, str] = field(default_factory=dict)  # layer -> why it is not packed
    tensor_bytes: int = 0
    max_rel_diff: float | None = None  # transformers' outputs against mpsearch's loader
    vllm: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "folder": str(self.folder), "quantized": len(self.quantized), "dense": self.dense,
            "tensor_bytes": self.tensor_bytes, "max_rel_diff": self.max_rel_diff, "vllm_problems": self.vllm,
        }


def write(out: Path, doc: PlanDocument, quantized: nn.Module, fp: nn.Module, tokenizer) -> TargetReport:
    """Write the compressed-tensors folder ``out`` from ``quantized`` (the export loaded by
    mpsearch's loader) and ``fp`` (the FP model, for its config and its other tensors)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config = getattr(fp, "config", None)
    if config is None or not hasattr(fp, "save_pretrained"):
        raise ExportError(
            f"--target {FOLDER} needs a Hugging Face model (model.source minilm, smollm2 or hf:DIR); "
            f"{type(fp).__name__} has no config.json to write"
        )
    dtype = next(fp.parameters()).dtype
    fp_modules = dict(fp.named_modules(remove_duplicate=False))
    q_modules = dict(quantized.named_modules(remove_duplicate=False))
    report = TargetReport(out)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple[int, int, bool], list[str]] = {}
    covered: set[str] = set()
    for entry, choice in doc.entries():
        module, qm = fp_modules[entry.name], q_modules[entry.name]
        names = (entry.name, *entry.aliases)
        covered.update(f"{n}.weight" for n in names)
        why = "16 bits: written dense in fp16" if choice.bits == FLOAT_BITS else ct_layout.rule(entry.kind.split("+"), entry.cols, qm.group_size)
        if why is None:
            key = (choice.bits, -1 if qm.group_size >= entry.cols else qm.group_size, bool(choice.symmetric))
            groups.setdefault(key, []).extend(names)
            tensors.update(_packed(entry.name, qm, dtype) if choice.symmetric else _naive(entry.name, qm, dtype))
            report.quantized[entry.name] = _group_name(key)
        else:  # fp16 holds a 16-bit layer exactly (transformers casts it to the model's dtype)
            tensors[f"{entry.name}.weight"] = module_layout(module, qm.matrix(torch.float32)).to(torch.float16 if choice.bits == FLOAT_BITS else dtype)
            report.dense[entry.name] = why
    # Everything else (norms, biases, embeddings the plan left out) as the export has it (a
    # repaired export tuned its norms and biases), each shared tensor once, under its first name
    # in the FP model (transformers ties the others).
    exported = quantized.state_dict()
    seen: set[int] = set()
    for name, t in fp.state_dict(keep_vars=True).items():
        if name in covered or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors[name] = exported.get(name, t).detach()
    schemes = {
        _group_name(key): QuantizationScheme(
            targets=sorted(set(names)),
            format="pack-quantized" if key[2] else "naive-quantized",
            weights=QuantizationArgs(
                num_bits=key[0], type="int", symmetric=key[2],
                strategy="channel" if key[1] == -1 else "group", group_size=None if key[1] == -1 else key[1],
            ),
        )
        for key, names in sorted(groups.items())
    }
    packed_names = {n for names in groups.values() for n in names}
    ignore = sorted(n for n, m in fp_modules.items() if isinstance(m, (nn.Linear, nn.Embedding)) and n not in packed_names)
    formats = {scheme.format for scheme in schemes.values()}
    qconfig = QuantizationConfig(config_groups=schemes, format=formats.pop() if len(formats) == 1 else "mixed-precision", quantization_status="compressed", ignore=ignore)
    out.mkdir(exist_ok=True)  # new, or the staging folder of a compressed-tensors study's export
    config = config.__class__.from_dict(config.to_dict())  # a copy: the workload's model stays as it is
    config.architectures = [type(fp).__name__]
    config.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = qconfig.to_dict()
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    report.tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    report.vllm = vllm_problems(doc, fp_modules)
    return report


def _group_name(key: tuple[int, int, bool]) -> str:
    """``w4g128``, ``w8ch`` (per channel), ``w3g64a`` (asymmetric)."""
    bits, group, symmetric = key
    return f"w{bits}{'ch' if group == -1 else f'g{group}'}{'' if symmetric else 'a'}"


def _packed(name: str, qm: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's compressed-tensors tensors from mpsearch's packed buffers (codes unchanged)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    half = 1 << (qm.bits - 1)
    codes = unpack(qm.qweight, qm.bits, qm.rows * qm.cols).reshape(qm.rows, qm.cols)
    signed = (codes.to(torch.int16) - half).to(torch.int8)
    out = {
        f"{name}.weight_packed": pack_to_int32(signed, qm.bits),
        f"{name}.weight_scale": qm.scales.to(dtype),  # exact: every fp16 and bf16 value is a float32
        f"{name}.weight_shape": torch.tensor([qm.rows, qm.cols], dtype=torch.int64),
    }
    if not qm.symmetric:
        zeros = (qm.zeros.to(torch.int16) - half).to(torch.int8)
        out[f"{name}.weight_zero_point"] = pack_to_int32(zeros, qm.bits, packed_dim=0)
    return out


def _naive(name: str, qm: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An asymmetric layer in ``naive-quantized`` form: signed codes one per int8, zero points unpacked."""
    half = 1 << (qm.bits - 1)
    codes = unpack(qm.qweight, qm.bits, qm.rows * qm.cols).reshape(qm.rows, qm.cols)
    return {
        f"{name}.weight": (codes.to(torch.int16) - half).to(torch.int8),
        f"{name}.weight_scale": qm.scales.to(dtype),
        f"{name}.weight_zero_point": (qm.zeros.to(torch.int16) - half).to(torch.int8),
    }


def vllm_problems(doc: PlanDocument, fp_modules: dict[str, nn.Module]) -> list[str]:
    """The planned layers vLLM's WNA16 kernels cannot run, each with the reason."""
    problems = []
    for entry, c in doc.entries():
        if c.bits == FLOAT_BITS:
            continue
        if c.bits not in VLLM_BITS:
            problems.append(f"{entry.name}: {c.bits} bits (vLLM runs 4 and 8)")
        elif not isinstance(fp_modules[entry.name], nn.Linear):
            problems.append(f"{entry.name}: {type(fp_modules[entry.name]).__name__}, not Linear")
        elif not c.symmetric:
            problems.append(f"{entry.name}: asymmetric")
        elif c.group_size not in VLLM_GROUPS and c.group_size != entry.cols:
            problems.append(f"{entry.name}: group size {c.group_size}")
    return problems


def readme_section(report: TargetReport, doc: PlanDocument, here: bool = False) -> str:
    """The export README's part on the compressed-tensors folder (``here``: the export is that folder)."""
    from collections import Counter

    groups = Counter(report.quantized.values())
    folder = "." if here else FOLDER
    size = (
        f"({report.tensor_bytes:,} tensor bytes, bytes(plan) of the study, which counted every layer in this layout)" if here else
        f"({report.tensor_bytes:,} tensor bytes; mpsearch's own file holds {doc.totals.bytes:,}: compressed-tensors keeps scales "
        "in the model's dtype and asymmetric codes one per byte)"
    )
    lines = [
        "",
        "## This folder: a Hugging Face model folder" if here else f"## `{FOLDER}/`: a Hugging Face model folder",
        "",
        "transformers loads it with the `compressed-tensors` package installed (`pip install compressed-tensors`):",
        "",
        "```python",
        "from transformers import AutoModel  # or the class in config.json's architectures",
        f'model = AutoModel.from_pretrained("{folder}")',
        "```",
        "",
        f"Its weights are the codes the search evaluated, in compressed-tensors' layout {size}.",
        "Config groups: " + ", ".join(f"`{g}` ({n} layers)" for g, n in sorted(groups.items())) + "." if groups else "No layer is quantized.",
    ]
    if report.max_rel_diff is not None:
        lines.append(f"Checked at export: transformers' outputs equal mpsearch's loader's to {report.max_rel_diff:.2g} (relative) on the evaluation split.")
    if report.dense:
        lines += ["", "Layers written dense, at their quantized values (compressed-tensors cannot hold them packed):", ""]
        lines += [f"- `{name}`: {why}" for name, why in report.dense.items()]
    if report.vllm:
        lines += ["", f"vLLM's WNA16 kernels run 4- and 8-bit layers only; it cannot run {len(report.vllm)} layers of this plan "
                  "(a study with `quant.bits = \"vllm\"` (4, 8, 16) makes plans it runs):", ""]
        lines += [f"- {p}" for p in report.vllm[:20]] + ([f"- and {len(report.vllm) - 20} more"] if len(report.vllm) > 20 else [])
    return "\n".join(lines) + "\n"


def load(folder: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The folder loaded by transformers itself (``AutoModel``'s class from config.json)."""
    import transformers

    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cls = getattr(transformers, raw["architectures"][0])
    return cls.from_pretrained(folder, device_map=str(device)).eval()


def check(folder: Path, quantized: nn.Module, workload) -> float:
    """The largest relative difference of transformers' outputs from ``quantized``'s (mpsearch's
    loader) over the workload's evaluation batches; over :data:`VERIFY_RTOL` is an error."""
    hf = load(folder, workload.device)
    worst = 0.0
    with torch.no_grad():
        for batch in workload.evaluation_batches():
            a, b = workload.forward(hf, batch).value.float(), workload.forward(quantized, batch).value.float()
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    if not math.isfinite(worst) or worst > VERIFY_RTOL:
        raise ExportError(
            f"transformers' outputs from the {FOLDER} folder differ from mpsearch's loader by {worst:.3g} (relative), "
            f"over the {VERIFY_RTOL:g} allowed; nothing was written. Report this with the compressed-tensors version"
        )
    return worst
