"""The candidate bank: every (layer, bits) of the menu quantized once, then swapped in.

A search evaluates thousands of plans on one model. Quantizing each layer for each plan
would cost far more than the evaluation itself, so the bank quantizes every layer at
every bit-width once, keeps the results, and applying a plan only points each layer's
weight at a cached tensor (``param.data = candidate``): no copy, no arithmetic.
:meth:`CandidateBank.restore` points them back at the model's own FP tensors, so the FP
weights come back bit-exactly (they are the very same tensors).

What the bank holds per (layer, bits):

* the packed form an export writes: packed uint8 codes, scales and zero points, or the
  fp16 weight at 16 bits (see :func:`CandidateBank.tensors`);
* unless built with ``packed=True``, the dequantized weight in the module's own layout
  and dtype, ready to swap in. With ``packed=True`` only the packed form is kept and
  each apply dequantizes, trading time for memory (see :meth:`memory`);
* its error statistics against the FP weight: MSE and SQNR (dB);
* its exact bytes, by DESIGN.md's definition.

The packed form is cached on disk, one safetensors file per bit-width, keyed by a hash
of the model's tensors, the scheme, the layer table, and (for methods that calibrate)
the calibration batches. A file that does not match its key or is damaged is rebuilt.
Applied weights are shared with the bank: treat a model with a plan applied as
read-only (evaluate it; do not train it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mpsearch.errors import MPSearchError
from mpsearch.hashing import batches_digest, json_digest, model_digest
from mpsearch.plan import Plan
from mpsearch.quant.apply import module_layout, quantizer
from mpsearch.quant.calibration import input_moments, unsupported_reason
from mpsearch.quant.gptq import Curvature
from mpsearch.quant.layers import LayerTable, QuantLayer, weight_matrix
from mpsearch.quant.packing import pack, unpack
from mpsearch.quant.rtn import QuantizedWeight
from mpsearch.quant.scheme import FLOAT_BITS

log = logging.getLogger(__name__)

BANK_FORMAT = 1
CACHE_ENV = "MPSEARCH_CACHE_DIR"


def default_cache_dir() -> Path | None:
    """``$MPSEARCH_CACHE_DIR`` (empty: no disk cache), else ``~/.cache/mpsearch/banks``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return Path(value) if value else None
    return Path.home() / ".cache" / "mpsearch" / "banks"


@dataclass
class Candidate:
    """One layer at one bit-width."""

    bits: int
    packed: dict[str, torch.Tensor]  # suffix ("qweight", "scales", "zeros" or "weight") -> tensor
    nbytes: int
    mse: float
    sqnr: float
    ready: torch.Tensor | None = None

    def quantized_weight(self, group_size: int, rows: int, cols: int) -> QuantizedWeight:
        codes = unpack(self.packed["qweight"], self.bits, rows * cols).reshape(rows, cols)
        return QuantizedWeight(codes, self.packed["scales"], self.packed.get("zeros"), self.bits, group_size)

    def dequantized(self, layer: QuantLayer) -> torch.Tensor:
        """The (rows × cols) float32 matrix this candidate stands for."""
        if self.bits == FLOAT_BITS:
            return self.packed["weight"].to(torch.float32)
        return self.quantized_weight(layer.group_size, layer.rows, layer.cols).dequantize()


class CandidateBank:
    """Every (layer, bits) candidate of one model under one scheme; see the module docstring."""

    def __init__(self, table: LayerTable, candidates: dict[tuple[str, int], Candidate], key: str, notes: dict[str, str], device: torch.device):
        self.table = table
        self.candidates = candidates
        self.key = key
        self.notes = notes
        self.device = device
        self.bits = tuple(sorted({b for _, b in candidates}))
        self._models: weakref.WeakKeyDictionary[nn.Module, list[tuple[QuantLayer, nn.Module, torch.Tensor]]] = weakref.WeakKeyDictionary()

    # -- building --------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        table: LayerTable,
        *,
        bits: Sequence[int] | None = None,
        batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
        forward: Callable[[nn.Module, Mapping[str, torch.Tensor]], object] | None = None,
        cache_dir: str | Path | None = None,
        packed: bool = False,
        progress: bool = False,
    ) -> "CandidateBank":
        """Quantize every layer of ``table`` in the FP ``model`` at each of ``bits`` (the menu).

        The bank lives on the model's device. ``batches`` and ``forward`` feed the
        calibration pass of methods that need one (``gptq``). With ``cache_dir``, each
        bit-width's candidates are read from, or written to, that folder.
        """
        method = quantizer(table.scheme.method)
        bits = tuple(sorted(set(bits if bits is not None else table.menu)))
        unknown = [b for b in bits if b not in table.menu]
        if unknown:
            raise MPSearchError(f"bits {unknown} are not in the bit menu {list(table.menu)}")
        batches = list(batches) if batches is not None else None
        if method.needs_calibration and (batches is None or forward is None):
            raise MPSearchError(f"quant.method {table.scheme.method!r} needs calibration batches; build the bank from a Workload")

        modules = dict(model.named_modules())
        device = next(iter(modules[table.layers[0].name].parameters())).device
        key = _cache_key(model, table, batches if method.needs_calibration else None)
        folder = Path(cache_dir) if cache_dir is not None else None
        forms = {b: found for b in bits if folder is not None and (found := _read_cache(folder, key, b, table, device)) is not None}
        notes = _fallback_notes(table, modules, method)
        missing = [b for b in bits if b not in forms]
        if missing:
            moments = input_moments(model, table, batches, forward, progress=progress) if method.needs_calibration else {}
            fresh = _quantize_all(table, modules, missing, method, moments, notes, progress)
            for b in missing:
                if folder is not None:
                    _write_cache(folder, key, b, fresh[b])
            forms.update(fresh)
        return cls(table, _candidates(table, modules, forms, bits, packed), key, notes, device)

    # -- reading ---------------------------------------------------------------------

    def candidate(self, name: str, bits: int) -> Candidate:
        try:
            return self.candidates[(name, bits)]
        except KeyError:
            self.table.layer(name)
            raise MPSearchError(f"the bank holds bits {list(self.bits)}, not {bits}; build it with that bit-width") from None

    def errors(self) -> dict[str, dict[int, dict[str, float]]]:
        """``{layer: {bits: {"mse", "sqnr", "bytes"}}}``."""
        return {
            layer.name: {b: {"mse": c.mse, "sqnr": c.sqnr, "bytes": c.nbytes} for b in self.bits for c in [self.candidates[(layer.name, b)]]}
            for layer in self.table.layers
        }

    def memory(self) -> dict[str, int]:
        """Bytes the bank holds: dequantized swap-ready tensors, and packed forms."""
        ready = sum(c.ready.numel() * c.ready.element_size() for c in self.candidates.values() if c.ready is not None)
        packed = sum(t.numel() * t.element_size() for c in self.candidates.values() for t in c.packed.values())
        return {"ready": ready, "packed": packed, "total": ready + packed}

    def tensors(self, plan: Plan | Mapping[str, int]) -> dict[str, torch.Tensor]:
        """The quantized layers' tensors an export of ``plan`` writes, named ``LAYER.SUFFIX``."""
        bits = self._check(plan)
        return {f"{layer.name}.{suffix}": t for layer in self.table.layers for suffix, t in self.candidate(layer.name, bits[layer.name]).packed.items()}

    # -- applying --------------------------------------------------------------------

    def apply(self, model: nn.Module, plan: Plan | Mapping[str, int], partial: bool = False) -> nn.Module:
        """Point each layer's weight of ``model`` at its candidate for ``plan``; see :meth:`restore`.

        With ``partial=True`` the plan may name only some layers; the others keep their FP
        weights (not fp16: the model's own), as a perturbation scan needs.
        """
        bits = self._check(plan, partial)
        for layer, module, fp in self._bound(model):
            if layer.name not in bits:
                module.weight.data = fp
                continue
            cand = self.candidates[(layer.name, bits[layer.name])]
            module.weight.data = cand.ready if cand.ready is not None else module_layout(module, cand.dequantized(layer))
        return model

    def restore(self, model: nn.Module) -> nn.Module:
        """Give ``model`` back the FP weights it had when a plan was first applied to it."""
        for _layer, module, fp in self._bound(model):
            module.weight.data = fp
        return model

    @contextlib.contextmanager
    def applied(self, model: nn.Module, plan: Plan | Mapping[str, int], partial: bool = False) -> Iterator[nn.Module]:
        """``with bank.applied(model, plan): loss(model)``, restored afterwards, even on error."""
        self.apply(model, plan, partial)
        try:
            yield model
        finally:
            self.restore(model)

    def _check(self, plan: Plan | Mapping[str, int], partial: bool = False) -> dict[str, int]:
        """The plan's ``{layer: bits}``, once its layers are the table's (some of them, if ``partial``)."""
        if partial:
            bits = Plan.coerce(plan).bits()
            for name in bits:
                self.table.layer(name)
        else:
            bits = self.table.check_plan(plan)
        missing = {b for b in bits.values() if b not in self.bits}
        if missing:
            raise MPSearchError(f"the plan uses bits {sorted(missing)} but the bank holds {list(self.bits)}")
        return bits

    def _bound(self, model: nn.Module) -> list[tuple[QuantLayer, nn.Module, torch.Tensor]]:
        """Each layer's module in ``model`` and its FP weight tensor, found once per model."""
        bound = self._models.get(model)
        if bound is None:
            modules = dict(model.named_modules())
            bound = []
            for layer in self.table.layers:
                module = modules.get(layer.name)
                if module is None:
                    raise MPSearchError(f"the model has no layer {layer.name!r}; apply the bank to the model it was built for")
                param = module.weight
                if tuple(param.shape) != layer.shape or param.device != self.device:
                    raise MPSearchError(
                        f"layer {layer.name!r} is {tuple(param.shape)} on {param.device}, the bank's is {layer.shape} on {self.device}"
                    )
                bound.append((layer, module, param.data))
            self._models[model] = bound
        return bound


def _fallback_notes(table: LayerTable, modules: dict[str, nn.Module], method) -> dict[str, str]:
    """The layers a calibrating method cannot take, and why (they are quantized with rtn)."""
    notes = {}
    if method.needs_calibration:
        for layer in table.layers:
            reason = unsupported_reason(modules[layer.name])
            if reason:
                notes[layer.name] = f"{table.scheme.method} cannot collect this layer's inputs ({reason}); it is quantized with rtn"
    return notes


def _quantize_all(table: LayerTable, modules, bits: Sequence[int], method, moments, notes: dict[str, str], progress: bool) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Every layer's packed form at each of ``bits``: ``{bits: {layer: form}}``."""
    from tqdm.auto import tqdm

    fresh: dict[int, dict[str, dict[str, torch.Tensor]]] = {b: {} for b in bits}
    desc = f"quantizing ({table.scheme.method}, {'/'.join(map(str, bits))} bits)"
    for layer in tqdm(table.layers, desc=desc, unit="layer", disable=not progress, leave=False):
        w = weight_matrix(modules[layer.name]).detach().to(torch.float32)
        curvature = None
        if layer.name in moments:
            curvature = Curvature.from_moment(moments[layer.name].xtx, table.scheme.damp, table.scheme.act_order)
        elif method.needs_calibration and layer.name not in notes:
            notes[layer.name] = f"{table.scheme.method} saw no input to this layer in the calibration pass; it is quantized with rtn"
        for b in bits:
            fresh[b][layer.name] = _packed_form(method.quantize, w, b, layer, table, curvature)
    return fresh


def _candidates(table: LayerTable, modules, forms, bits: Sequence[int], packed: bool) -> dict[tuple[str, int], Candidate]:
    """Each (layer, bits) with its exact bytes and its error against the FP weight."""
    candidates = {}
    for layer in table.layers:
        module = modules[layer.name]
        w = weight_matrix(module).detach().to(torch.float32)
        for b in bits:
            cand = Candidate(bits=b, packed=forms[b][layer.name], nbytes=layer.bytes(b, table.scheme), mse=math.nan, sqnr=math.nan)
            w_hat = cand.dequantized(layer)
            cand.mse, cand.sqnr = _errors(w, w_hat)
            if not packed:
                cand.ready = module_layout(module, w_hat)
            candidates[(layer.name, b)] = cand
    return candidates


def _packed_form(quantize, w: torch.Tensor, bits: int, layer: QuantLayer, table: LayerTable, curvature) -> dict[str, torch.Tensor]:
    if bits == FLOAT_BITS:
        return {"weight": w.to(torch.float16).contiguous()}
    q = quantize(w, bits, layer.group_size, table.scheme, curvature)
    form = {"qweight": pack(q.codes, bits), "scales": q.scales.contiguous()}
    if q.zeros is not None:
        form["zeros"] = q.zeros.contiguous()
    return form


def _errors(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[float, float]:
    diff = (w - w_hat).pow(2).sum().item()
    mse = diff / w.numel()
    sqnr = math.inf if diff == 0 else 10 * math.log10(w.pow(2).sum().item() / diff)
    return mse, sqnr


# -- the disk cache ----------------------------------------------------------------------


def _cache_key(model: nn.Module, table: LayerTable, batches: list[Mapping[str, torch.Tensor]] | None) -> str:
    layers = [(layer.name, layer.rows, layer.cols, layer.group_size) for layer in table.layers]
    parts = {
        "bank": BANK_FORMAT,
        "scheme": table.scheme.to_dict(),
        "layers": layers,
        "model": model_digest(model),
        "data": batches_digest(batches) if batches is not None else None,
    }
    return json_digest(parts)


def _cache_path(folder: Path, key: str, bits: int) -> Path:
    return folder / f"{key}-{bits}bit.safetensors"


def _read_cache(folder: Path, key: str, bits: int, table: LayerTable, device: torch.device) -> dict | None:
    from safetensors import safe_open

    path = _cache_path(folder, key, bits)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("bits") != str(bits):
                raise ValueError("its metadata names another bank")
            forms: dict[str, dict[str, torch.Tensor]] = {}
            for layer in table.layers:
                expected = _expected_shapes(layer, bits, table)
                form = {}
                for suffix, (shape, dtype) in expected.items():
                    t = f.get_tensor(f"{layer.name}.{suffix}")
                    if tuple(t.shape) != shape or t.dtype != dtype:
                        raise ValueError(f"{layer.name}.{suffix} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
                    form[suffix] = t.to(device, copy=True)  # own memory, not a view of the file
                forms[layer.name] = form
        return forms
    except Exception as e:  # any damage means: rebuild this bit-width
        log.warning("candidate cache %s is unusable (%s); rebuilding it", path, e)
        return None


def _expected_shapes(layer: QuantLayer, bits: int, table: LayerTable) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if bits == FLOAT_BITS:
        return {"weight": ((layer.rows, layer.cols), torch.float16)}
    from mpsearch.quant.packing import packed_nbytes
    from mpsearch.quant.scheme import SCALE_DTYPES

    groups = (layer.rows, layer.n_groups // layer.rows)
    shapes = {"qweight": ((packed_nbytes(layer.n, bits),), torch.uint8), "scales": (groups, SCALE_DTYPES[table.scheme.scale_dtype])}
    if not table.scheme.symmetric:
        shapes["zeros"] = (groups, torch.uint8)
    return shapes


def _write_cache(folder: Path, key: str, bits: int, forms: dict[str, dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{suffix}": t.cpu().contiguous() for name, form in forms.items() for suffix, t in form.items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bank-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": f"mpsearch-bank-{BANK_FORMAT}", "key": key, "bits": str(bits)})
        os.replace(tmp, _cache_path(folder, key, bits))  # readers see the whole file or none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
