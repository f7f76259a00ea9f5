"""Load an export: the model with its quantizable layers running from the packed file.

``load_quantized(DIR, model=...)`` checks the folder before it trusts it:

* ``plan.json`` must be a plan this mpsearch reads (format and version);
* ``model.safetensors`` must have the size and sha256 that ``plan.json`` records, so a
  truncated or altered file is refused before a byte of it is used;
* every layer of the plan must exist in the model with the plan's shape, and the file
  must hold exactly the tensors the model needs, each at its shape and dtype: a missing
  tensor, or a plan for another model, is named in the error.

Then each planned layer is replaced by a :class:`~mpsearch.quant.modules.QuantizedModule`
and every tensor is copied from the file into place. Nothing of the model's own weights
is used: it only supplies the architecture.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from mpsearch.errors import MPSearchError, first_line
from mpsearch.export.document import PlanDocument
from mpsearch.quant.layers import QuantLayer, tensor_key
from mpsearch.quant.modules import QuantizedModule, set_decode_cache

MODEL_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
TENSOR_FORMAT = "mpsearch-packed"
TENSOR_VERSION = "1"  # the layout of model.safetensors (FORMAT.md); plan.json has its own version


class ExportError(MPSearchError):
    """An export folder that is missing, damaged, or made for another model."""


def read_plan(folder: str | Path) -> PlanDocument:
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is a file" if folder.exists() else "does not exist"
        raise ExportError(f"export folder {str(folder)!r} {problem}; pass the --out folder of `mpsearch export`")
    return PlanDocument.read(folder / PLAN_FILE)


def check_file(folder: Path, doc: PlanDocument) -> Path:
    """``model.safetensors``, once its size and sha256 match what ``plan.json`` recorded."""
    path = folder / MODEL_FILE
    info = doc.files.get(MODEL_FILE)
    if "config.json" in doc.files:  # a compressed-tensors study's export: the model file is that library's
        raise ExportError(
            f"{str(folder)!r} is a compressed-tensors export (target compressed-tensors): load it with transformers' "
            "AutoModel.from_pretrained (compressed-tensors installed); mpsearch loads its own format only"
        )
    if info is None:
        if "model.gguf" in doc.files:
            raise ExportError(f"{str(folder)!r} is a GGUF export (target gguf): run its model.gguf with llama.cpp; mpsearch loads its own format only")
        raise ExportError(f"{str(folder / PLAN_FILE)!r} records no {MODEL_FILE}; export the study again")
    if not path.is_file():
        raise ExportError(f"{str(folder)!r} has no {MODEL_FILE}; export the study again")
    size = path.stat().st_size
    if size != info.bytes:
        raise ExportError(f"{str(path)!r} is {size} bytes but plan.json records {info.bytes}: it is truncated or was changed; export the study again")
    if sha256_of(path) != info.sha256:
        raise ExportError(f"{str(path)!r} does not match the sha256 in plan.json: it is corrupted or was changed; export the study again")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_quantized(
    folder: str | Path, model: nn.Module | None = None, *, device: str | torch.device = "cpu", trust_code: bool = False,
    decode_cache: bool = False,
) -> nn.Module:
    """The exported model, quantized layers packed in memory, on ``device``, in eval mode.

    ``model`` is an instance of the architecture the study ran on (its weights are not
    used and it is modified in place); without one, the model is rebuilt from the source
    that ``plan.json`` records. A ``python:`` source would import (run) the module that
    plan.json names, so that needs ``trust_code=True``, as transformers' ``trust_remote_code``.

    ``decode_cache=True`` keeps each layer's decoded weight after its first forward
    (:func:`~mpsearch.quant.modules.set_decode_cache`): FP speed, at the FP model's memory for the
    quantized layers. Off (the default), every forward decodes and the memory saving is real.
    """
    folder = Path(folder)
    doc = read_plan(folder)
    path = check_file(folder, doc)
    if model is None:
        from mpsearch.workload.models import load_model

        info = doc.provenance.model
        if info.source.startswith("python:") and not trust_code:
            raise ExportError(
                f"plan.json builds its model with {info.source!r}, which imports and runs that Python module; "
                "pass the model yourself, or trust_code=True if you trust the module"
            )
        model = load_model(info.source, Path(info.base_dir), info.dtype).model
    _replace_layers(model, doc)
    _fill(model, path, folder)
    set_decode_cache(model, decode_cache)
    return model.to(device).eval()


def _replace_layers(model: nn.Module, doc: PlanDocument) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    scale_dtype = doc.provenance.scheme.get("scale_dtype", "float16")
    for entry, choice in doc.entries():
        module = modules.get(entry.name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ExportError(f"the model has no layer {entry.name!r} with a weight: the export holds a plan for another model")
        if list(module.weight.shape) != entry.shape:
            raise ExportError(
                f"layer {entry.name!r} is {tuple(module.weight.shape)} in the model but {tuple(entry.shape)} in the plan: "
                "the export holds a plan for another model"
            )
        layer = QuantLayer(entry.name, entry.kind, tuple(entry.shape), entry.rows, entry.cols, choice.group_size or entry.cols, aliases=tuple(entry.aliases))
        replacement = QuantizedModule.replacing(module, layer, choice.bits, bool(choice.symmetric), scale_dtype)
        for name in (entry.name, *entry.aliases):
            _set_module(model, name, replacement)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _fill(model: nn.Module, path: Path, folder: Path) -> None:
    """Copy every tensor of the file into the model; exactly the model's tensors must be there."""
    from safetensors import SafetensorError, safe_open

    targets: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict(keep_vars=True).items():  # a shared tensor is stored once, first name
        key = tensor_key(t)
        if key not in seen:
            seen.add(key)
            targets[name] = t
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != TENSOR_FORMAT:
                raise ExportError(f"{str(path)!r} is not an mpsearch packed model (format {meta.get('format')!r}); export the study again")
            stored = set(f.keys())
            missing = [n for n in targets if n not in stored]
            if missing:
                raise ExportError(f"{str(path)!r} has no tensor {missing[0]!r} ({len(missing)} missing): the file is incomplete or for another model; export the study again")
            extra = sorted(stored - set(targets))
            if extra:
                raise ExportError(f"{str(path)!r} holds tensor {extra[0]!r}, which the model does not have: the export is for another model")
            with torch.no_grad():
                for name, target in targets.items():
                    t = f.get_tensor(name)
                    if t.shape != target.shape or t.dtype != target.dtype:
                        raise ExportError(
                            f"tensor {name!r} is {tuple(t.shape)} {t.dtype} in {MODEL_FILE} but the model needs {tuple(target.shape)} {target.dtype}: "
                            "the export is for another model"
                        )
                    target.copy_(t)
    except SafetensorError as e:
        raise ExportError(f"{str(path)!r} cannot be read as safetensors ({first_line(e)}); export the study again") from None


def file_layout(path: Path) -> dict:
    """The safetensors header of ``path``: ``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))
