"""The candidate bank: every (layer, bits) of the menu quantized once, kept packed, swapped in.

A search evaluates thousands of plans on one model. Quantizing each layer for each plan would
cost far more than the evaluation itself, so the bank quantizes every layer at every bit-width
once and keeps the results in the packed form an export writes: packed uint8 codes, scales and
zero points, or the fp16 weight at 16 bits (see :meth:`CandidateBank.tensors`). That is all it
holds (about 2.1 bytes per weight for the menu 2/3/4/8/16 at group 128), so its memory is bounded
by the model's size, not five dequantized copies of it.

Applying a plan is a *delta swap*: only the layers whose bits differ from what the model holds
now are decoded, straight into the layer's own weight tensor (in its layout, dtype and device).
A search's consecutive plans share most layers, so a trial decodes a few. The FP weights of the
layers a plan displaced are kept aside and :meth:`CandidateBank.restore` puts them back, bit for
bit (they are the very tensors), unless the caller gave them up (``keep_fp=False``: a scorer that
owns its model and only ever applies whole plans needs no second copy of it).

Also per (layer, bits): its error statistics against the FP weight (MSE, SQNR in dB) and its
exact bytes, by DESIGN.md's definition.

GPTQ's statistics (each layer's ``XᵀX``) are gathered for a group of layers at a time, within a
memory bound, and freed as soon as the group is quantized, so only one group's matrices are
alive at once. The packed form is cached on disk, one safetensors file per bit-width, keyed by a
hash of the model's tensors, the scheme, the layer table, and (for methods that calibrate) the
calibration batches. A file that does not match its key or is damaged is rebuilt.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mpsearch.errors import MPSearchError
from mpsearch.hashing import batches_digest, json_digest, model_digest
from mpsearch.memory import trim
from mpsearch.plan import Plan, Width, bits_of, width_order
from mpsearch.quant.apply import module_layout, quantizer
from mpsearch.quant.calibration import input_moments, unsupported_reason
from mpsearch.quant.gptq import Curvature
from mpsearch.quant.layers import LayerTable, QuantLayer, weight_matrix
from mpsearch.quant.packing import pack, unpack
from mpsearch.quant.rtn import QuantizedWeight
from mpsearch.quant.scheme import FLOAT_BITS
from mpsearch.quant.tensorfile import save_tensors

log = logging.getLogger(__name__)

BANK_FORMAT = 1
CACHE_ENV = "MPSEARCH_CACHE_DIR"
MOMENT_BYTES = 128 << 20  # GPTQ: the XᵀX matrices alive at once (one layer's at least)


def default_cache_dir() -> Path | None:
    """``$MPSEARCH_CACHE_DIR`` (empty: no disk cache), else ``~/.cache/mpsearch/banks``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return Path(value) if value else None
    return Path.home() / ".cache" / "mpsearch" / "banks"


@dataclass
class Candidate:
    """One layer at one bit-width, packed (or, for the gguf target, as llama.cpp's blocks)."""

    bits: int
    packed: dict[str, torch.Tensor]  # suffix ("qweight", "scales", "zeros", "weight", or gguf "blocks") -> tensor
    nbytes: int
    mse: float
    sqnr: float
    type: str | None = None  # the gguf target's llama.cpp type (Q4_K, ...)
    group_size: int | None = None  # a scheme option's group size (None: the layer's)

    def quantized_weight(self, group_size: int, rows: int, cols: int) -> QuantizedWeight:
        codes = unpack(self.packed["qweight"], self.bits, rows * cols).reshape(rows, cols)
        return QuantizedWeight(codes, self.packed["scales"], self.packed.get("zeros"), self.bits, group_size)

    def dequantized(self, layer: QuantLayer) -> torch.Tensor:
        """The (rows × cols) float32 matrix this candidate stands for, on the bank's device."""
        if "weight" in self.packed:
            return self.packed["weight"].to(torch.float32)
        if "blocks" in self.packed:
            from mpsearch.quant.gguf import dequantize

            return dequantize(self.packed["blocks"], self.type, layer.rows, layer.cols)
        return self.quantized_weight(self.group_size or layer.group_size, layer.rows, layer.cols).dequantize()


@dataclass
class _Held:
    """What one model holds now: each layer's bits (None: its FP weight), and the FP weights put aside."""

    layers: list[tuple[QuantLayer, nn.Module]]
    bits: dict[str, int | None]
    aside: dict[str, torch.Tensor] = field(default_factory=dict)
    given_up: set[str] = field(default_factory=set)


class CandidateBank:
    """Every (layer, bits) candidate of one model under one scheme; see the module docstring."""

    def __init__(self, table: LayerTable, candidates: dict[tuple[str, int], Candidate], key: str, notes: dict[str, str], device: torch.device):
        self.table = table
        self.candidates = candidates
        self.key = key
        self.notes = notes
        self.device = device
        self.bits = tuple(sorted({b for _, b in candidates}, key=width_order))  # the menu entries it holds: bits, and scheme options
        self.decoded = 0  # layers decoded into a model so far (a delta swap decodes only what changed)
        self.imatrix: Path | None = None  # gguf with target.imatrix: the importance matrix its candidates were made with
        self._models: weakref.WeakKeyDictionary[nn.Module, _Held] = weakref.WeakKeyDictionary()

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
        model_key: str | None = None,
        device: str | torch.device | None = None,
        moment_bytes: int = MOMENT_BYTES,
        progress: bool = False,
        source_dir: str | Path | None = None,
        imatrix: tuple[str, int] | None = None,
    ) -> "CandidateBank":
        """Quantize every layer of ``table`` in the FP ``model`` at each of ``bits`` (the menu).

        The packed candidates live on ``device`` (by default the model's; on a GPU, the host when
        they would take more than half of its free memory). ``batches`` and ``forward`` feed the
        calibration pass of methods that need one (``gptq``). With ``cache_dir``, each bit-width's
        candidates are read from, or written to, that folder. ``model_key``: the model's hash, when
        the caller has it already. For the gguf target (``table.target``) the candidates are
        llama.cpp's (:mod:`mpsearch.quant.gguf`), made from the Hugging Face folder ``source_dir``;
        ``imatrix`` (calibration text, context length) has llama-imatrix weigh their rounding, and the
        importance matrix is kept beside the cache (else in a temporary folder the bank owns) for
        the export, which must quantize with the same one.
        """
        method = quantizer(table.scheme.method)
        bits = tuple(sorted(set(bits if bits is not None else table.menu), key=width_order))
        unknown = [b for b in bits if b not in table.menu]
        if unknown:
            raise MPSearchError(f"bits {unknown} are not in the bit menu {list(table.menu)}")
        batches = list(batches) if batches is not None else None
        if method.needs_calibration and (batches is None or forward is None):
            raise MPSearchError(f"quant.method {table.scheme.method!r} needs calibration batches; build the bank from a Workload")

        modules = dict(model.named_modules())
        model_device = next(iter(modules[table.layers[0].name].parameters())).device
        home = torch.device(device) if device is not None else _home(model_device, table, bits)
        gguf = table.target == "gguf"
        if gguf and source_dir is None:
            raise MPSearchError("the gguf target's bank is made by llama.cpp from the model's Hugging Face folder; build it from a Workload")
        key = _cache_key(model, table, batches if method.needs_calibration and not gguf else None, model_key, imatrix if gguf else None)
        folder = Path(cache_dir) if cache_dir is not None else None
        levels = sorted({table.layer_level(n, b) for n in table.names for b in bits}, key=width_order)  # the gguf target's aliases need their level
        forms = {b: found for b in levels if folder is not None and (found := _read_cache(folder, key, b, table, home)) is not None}
        importance = _imatrix_path(folder, key) if gguf and imatrix is not None else None
        if importance is not None and not importance.is_file():
            forms = {}  # candidates without the matrix they were made with cannot be exported: make both again
        notes = {} if gguf else _fallback_notes(table, modules, method)
        missing = [b for b in levels if b not in forms]
        if missing:
            if gguf:
                from mpsearch.quant.gguf import build_candidates

                weights = {layer.name: weight_matrix(modules[layer.name]).detach() for layer in table.layers}
                fresh = build_candidates(Path(source_dir), table, weights, tuple(missing), progress, (*imatrix, importance) if importance else None)
            else:
                fresh = _quantize_all(model, table, modules, missing, method, batches, forward, notes, moment_bytes, progress)
            for b in missing:
                if folder is not None:
                    _write_cache(folder, key, b, fresh[b])
                forms[b] = {name: {k: t.to(home) for k, t in form.items()} for name, form in fresh[b].items()}
        bank = cls(table, _candidates(table, modules, forms, bits), key, notes, home)
        bank.imatrix = importance
        if importance is not None and folder is None:  # the bank's own temporary folder goes with it
            weakref.finalize(bank, shutil.rmtree, importance.parent, True)
        trim()  # the quantizer's temporaries go back before the next phase piles on them
        return bank

    # -- reading ---------------------------------------------------------------------

    def candidate(self, name: str, bits: int) -> Candidate:
        try:
            return self.candidates[(name, bits)]
        except KeyError:
            self.table.layer(name)
            raise MPSearchError(f"the bank holds bits {list(self.bits)}, not {bits!r}; build it with that bit-width") from None

    def errors(self) -> dict[str, dict[int, dict[str, float]]]:
        """``{layer: {bits: {"mse", "sqnr", "bytes"}}}``."""
        return {
            layer.name: {b: {"mse": c.mse, "sqnr": c.sqnr, "bytes": c.nbytes} for b in self.bits if (c := self.candidates.get((layer.name, b))) is not None}
            for layer in self.table.layers
        }

    def memory(self) -> dict[str, int]:
        """Bytes the bank holds: its packed candidates, and nothing else."""
        unique = {id(c): c for c in self.candidates.values()}.values()  # the gguf target's aliases once
        packed = sum(t.numel() * t.element_size() for c in unique for t in c.packed.values())
        return {"packed": packed, "total": packed}

    def tensors(self, plan: Plan | Mapping[str, int]) -> dict[str, torch.Tensor]:
        """The quantized layers' tensors an export of ``plan`` writes, named ``LAYER.SUFFIX``."""
        bits = self._check(plan)
        return {f"{layer.name}.{suffix}": t for layer in self.table.layers for suffix, t in self.candidate(layer.name, bits[layer.name]).packed.items()}

    # -- applying --------------------------------------------------------------------

    def apply(self, model: nn.Module, plan: Plan | Mapping[str, int], partial: bool = False, keep_fp: bool = True) -> nn.Module:
        """Give ``model`` the weights of ``plan``: a delta swap (see the module docstring).

        With ``partial=True`` the plan may name only some layers; the others get their FP
        weights back (the model's own, not fp16), as a perturbation scan needs. With
        ``keep_fp=False`` the FP weights of displaced layers are not kept: less memory, and no
        :meth:`restore` for those layers afterwards.
        """
        bits = self._check(plan, partial)
        held = self._held(model)
        for layer, module in held.layers:
            want = bits.get(layer.name)
            if held.bits[layer.name] == want:
                continue
            if want is None:
                self._put_back(held, layer, module)
                continue
            weight = module.weight
            if held.bits[layer.name] is None:  # FP now: keep it aside (or give it up) and decode into a tensor of its own
                if keep_fp:
                    held.aside[layer.name] = weight.data
                    weight.data = torch.empty_like(weight.data)
                else:
                    held.given_up.add(layer.name)
            elif not keep_fp and held.aside.pop(layer.name, None) is not None:
                held.given_up.add(layer.name)
            decoded = module_layout(module, self.candidates[(layer.name, want)].dequantized(layer).to(weight.device))
            weight.data.copy_(decoded)
            held.bits[layer.name] = want
            self.decoded += 1
        return model

    def holds_fp(self, model: nn.Module) -> bool:
        """Whether ``model`` has (or can get back with :meth:`restore`) every FP weight."""
        return not self._held(model).given_up

    def restore(self, model: nn.Module) -> nn.Module:
        """Give ``model`` back the FP weights it had when a plan was first applied to it."""
        held = self._held(model)
        for layer, module in held.layers:
            if held.bits[layer.name] is not None:
                self._put_back(held, layer, module)
        return model

    @contextlib.contextmanager
    def applied(self, model: nn.Module, plan: Plan | Mapping[str, int], partial: bool = False) -> Iterator[nn.Module]:
        """``with bank.applied(model, plan): loss(model)``, restored afterwards, even on error."""
        self.apply(model, plan, partial)
        try:
            yield model
        finally:
            self.restore(model)

    def _put_back(self, held: _Held, layer: QuantLayer, module: nn.Module) -> None:
        if layer.name in held.given_up:
            raise MPSearchError(
                f"layer {layer.name!r} no longer has its FP weights (a plan was applied with keep_fp=False); "
                "load the model again to score a partial plan"
            )
        module.weight.data = held.aside.pop(layer.name)
        held.bits[layer.name] = None

    def _check(self, plan: Plan | Mapping[str, int], partial: bool = False) -> dict[str, int]:
        """The plan's ``{layer: bits}``, once its layers are the table's (some of them, if ``partial``)."""
        if partial:
            bits = self.table.widths(plan)
            for name in bits:
                self.table.layer(name)
        else:
            bits = self.table.check_plan(plan)
        missing = {b for b in bits.values() if b not in self.bits}
        if missing:
            raise MPSearchError(f"the plan uses bits {sorted(missing, key=width_order)} but the bank holds {list(self.bits)}")
        return bits

    def _held(self, model: nn.Module) -> _Held:
        """What ``model`` holds, its layers found once per model (and checked against the table)."""
        held = self._models.get(model)
        if held is None:
            modules = dict(model.named_modules())
            layers = []
            for layer in self.table.layers:
                module = modules.get(layer.name)
                if module is None:
                    raise MPSearchError(f"the model has no layer {layer.name!r}; apply the bank to the model it was built for")
                if tuple(module.weight.shape) != layer.shape:
                    raise MPSearchError(
                        f"layer {layer.name!r} is {tuple(module.weight.shape)} on {module.weight.device}, the bank's is {layer.shape} on {self.device}"
                    )
                layers.append((layer, module))
            held = self._models[model] = _Held(layers, {layer.name: None for layer, _ in layers})
        return held


def _home(model_device: torch.device, table: LayerTable, bits: Sequence[int]) -> torch.device:
    """Where the packed candidates live: with the model, or on the host when a GPU lacks room."""
    if model_device.type != "cuda":
        return model_device
    need = sum(table.layer_bytes(layer.name, b) for layer in table.layers for b in bits)
    free, _total = torch.cuda.mem_get_info(model_device)
    return model_device if need < free // 2 else torch.device("cpu")


def _fallback_notes(table: LayerTable, modules: dict[str, nn.Module], method) -> dict[str, str]:
    """The layers a calibrating method cannot take, and why (they are quantized with rtn)."""
    notes = {}
    if method.needs_calibration:
        for layer in table.layers:
            reason = unsupported_reason(modules[layer.name])
            if reason:
                notes[layer.name] = f"{table.scheme.method} cannot collect this layer's inputs ({reason}); it is quantized with rtn"
    return notes


def _groups(table: LayerTable, budget: int) -> list[list[QuantLayer]]:
    """Consecutive layers whose XᵀX matrices (cols² float32 each) fit ``budget`` together."""
    groups, current, used = [], [], 0
    for layer in table.layers:
        size = layer.cols * layer.cols * 4
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(layer)
        used += size
    return groups + ([current] if current else [])


def _quantize_all(model, table: LayerTable, modules, bits: Sequence[int], method, batches, forward, notes: dict[str, str], moment_bytes: int, progress: bool) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Every layer's packed form at each of ``bits``: ``{bits: {layer: form}}``, on the host.

    A calibrating method gathers ``XᵀX`` for one group of layers per calibration pass (see
    :func:`_groups`) and frees it once the group is quantized.
    """
    from tqdm.auto import tqdm

    fresh: dict[int, dict[str, dict[str, torch.Tensor]]] = {b: {} for b in bits}
    groups = _groups(table, moment_bytes) if method.needs_calibration else [table.layers]
    desc = f"quantizing ({table.scheme.method}, {'/'.join(map(str, bits))} bits)"
    bar = tqdm(total=len(table.layers), desc=desc, unit="layer", disable=not progress, leave=False)
    for group in groups:
        moments = input_moments(model, table, batches, forward, layers=group) if method.needs_calibration else {}
        factored: tuple = (None, None)  # (moment, its Curvature): layers sharing an input come in a row
        for layer in group:
            w = weight_matrix(modules[layer.name]).detach().to(torch.float32)
            curvature = None
            moment = moments.pop(layer.name, None)
            if moment is not None:
                if factored[0] is not moment:
                    factored = (moment, Curvature.from_moment(moment.xtx, table.scheme.damp, table.scheme.act_order))
                curvature = factored[1]
                del moment
            elif method.needs_calibration and layer.name not in notes:
                notes[layer.name] = f"{table.scheme.method} saw no input to this layer in the calibration pass; it is quantized with rtn"
            for b in bits:
                fresh[b][layer.name] = {k: t.cpu() for k, t in packed_form(method.quantize, w, b, layer, table, curvature).items()}
            del w, curvature
            trim(collect=False)  # the quantizer's temporaries go back at once: left to pile up, they outgrow the bank
            bar.update()
        del moments, factored
    bar.close()
    return fresh


def _candidates(table: LayerTable, modules, forms, bits: Sequence[int]) -> dict[tuple[str, int], Candidate]:
    """Each (layer, bits) with its exact bytes and its error against the FP weight. A level a
    layer cannot take (gguf target) is the very candidate of the level it takes instead."""
    candidates = {}
    for layer in table.layers:
        w = weight_matrix(modules[layer.name]).detach().to(torch.float32)
        made: dict[int, Candidate] = {}
        for b in bits:
            level = table.layer_level(layer.name, b)
            if level not in made:
                nbytes = table.layer_bytes(layer.name, level)
                own, _scheme, level_bits = table.at(layer.name, level)
                cand = Candidate(
                    bits=level_bits, packed=forms[level][layer.name], nbytes=nbytes, mse=math.nan, sqnr=math.nan, type=table.type_of(layer.name, level),
                    group_size=own.group_size if own.group_size != layer.group_size else None,
                )
                cand.mse, cand.sqnr = _errors(w, cand.dequantized(layer).to(w.device))
                made[level] = cand
            candidates[(layer.name, b)] = made[level]
        for level, cand in made.items():  # a plan holds the level a layer takes: the bank answers for it too
            candidates[(layer.name, level)] = cand
    return candidates


def packed_form(quantize, w: torch.Tensor, width: Width, layer: QuantLayer, table: LayerTable, curvature) -> dict[str, torch.Tensor]:
    """``layer``'s weight ``w`` at menu entry ``width`` (a scheme option: its group size and symmetry)."""
    layer, scheme, bits = table.at(layer.name, width)
    if bits == FLOAT_BITS:
        return {"weight": w.to(torch.float16).contiguous()}
    q = quantize(w, bits, layer.group_size, scheme, curvature)
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


def _imatrix_path(folder: Path | None, key: str) -> Path:
    """Where a gguf bank's importance matrix is kept: beside its cache files, or in a new temporary folder."""
    if folder is None:
        return Path(tempfile.mkdtemp(prefix="mpsearch-imatrix-")) / "imatrix.gguf"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}-imatrix.gguf"


def _cache_key(
    model: nn.Module, table: LayerTable, batches: list[Mapping[str, torch.Tensor]] | None, model_key: str | None = None, imatrix: tuple[str, int] | None = None,
) -> str:
    layers = [(layer.name, layer.rows, layer.cols, layer.group_size) for layer in table.layers]
    parts = {
        "bank": BANK_FORMAT,
        "scheme": table.scheme.to_dict(),
        "layers": layers,
        "model": model_key or model_digest(model),
        "data": batches_digest(batches) if batches is not None else None,
    }
    if table.target == "gguf":  # a later field: banks of mpsearch's own codes (compressed-tensors' too) keep their keys
        from mpsearch.quant.llama_cpp import LLAMA_CPP_PYTHON

        parts["target"] = {"format": table.target, "llama.cpp": LLAMA_CPP_PYTHON, "types": table.types}
        if imatrix is not None:  # later still: banks made without one keep their keys
            parts["target"]["imatrix"] = {"text": json_digest(imatrix[0]), "n_ctx": imatrix[1]}
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
            for layer in _own_layers(table, bits):
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


def _own_layers(table: LayerTable, bits: int) -> list[QuantLayer]:
    """The layers a cache file of ``bits`` holds: those that take that level (all, but for gguf)."""
    return [layer for layer in table.layers if table.layer_level(layer.name, bits) == bits]


def _expected_shapes(layer: QuantLayer, width: Width, table: LayerTable) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    bits = width if table.target == "gguf" else bits_of(width)
    if bits == FLOAT_BITS:
        return {"weight": ((layer.rows, layer.cols), torch.float16)}
    if table.target == "gguf":
        return {"blocks": ((layer.rows, table.layer_bytes(layer.name, bits) // layer.rows), torch.uint8)}
    from mpsearch.quant.packing import packed_nbytes
    from mpsearch.quant.scheme import SCALE_DTYPES

    layer, scheme, _bits = table.at(layer.name, width)
    groups = (layer.rows, layer.n_groups // layer.rows)
    shapes = {"qweight": ((packed_nbytes(layer.n, bits),), torch.uint8), "scales": (groups, SCALE_DTYPES[scheme.scale_dtype])}
    if not scheme.symmetric:
        shapes["zeros"] = (groups, torch.uint8)
    return shapes


def _write_cache(folder: Path, key: str, bits: int, forms: dict[str, dict[str, torch.Tensor]]) -> None:
    """One bit-width's candidates, written whole or not at all (readers never see half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{suffix}": t for name, form in forms.items() for suffix, t in form.items()}
    save_tensors(tensors, _cache_path(folder, key, bits), {"format": f"mpsearch-bank-{BANK_FORMAT}", "key": key, "bits": str(bits)})
