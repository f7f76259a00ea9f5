"""Repair: a short quantization-aware tuning of a chosen plan (``export --repair STEPS``).

The codes stay as they are. What is tuned, by distillation on the calibration split, is what a
packed export stores in floating point besides them. The objective (``step_loss``, built by the
export) is the study's own loss against the FP model's outputs, plus by default a hidden-state
term (:func:`hidden_distance`, weighted by ``export.repair_hidden``): each block's output against
the FP model's. The study's loss alone is a few numbers a sentence (one pooled embedding); the
hidden states give every block a target on every token, which is what keeps a longer repair from
fitting the calibration sentences and losing on held-out ones. What is tuned:

* each quantized layer's group scales, as a learned gain ``exp(g)`` on the stored scale (one
  ``g`` per group, starting at 0, so the first step starts from the plan itself);
* the LayerNorm weights and biases, and the biases of the quantized layers.

The weight of a quantized layer is a :mod:`torch.nn.utils.parametrize` parametrization of the
FP module: ``scale · exp(g) · (q − offset)`` laid out as the module's weight, so the model runs
as it is, with autograd through the gains. Adam takes ``steps`` steps over the calibration
batches in order (a step is one batch), at a constant learning rate or one that decays on a
cosine to 0, from ``torch.manual_seed(seed)``: the same inputs give the same result.

At the end each scale is rounded to the stored dtype, and the new forms (same codes, new scales)
and the tuned tensors come back with the losses, for the caller to keep or not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from mpsearch.plan import Width
from mpsearch.quant.apply import module_layout
from mpsearch.quant.layers import Conv1D, LayerTable, QuantLayer
from mpsearch.quant.packing import unpack
from mpsearch.quant.scheme import FLOAT_BITS


@dataclass
class Repaired:
    forms: dict[str, dict[str, torch.Tensor]]  # layer -> its packed form, new scales
    tensors: dict[str, torch.Tensor]  # state-dict name -> tuned norm or bias
    curve: list[float] = field(default_factory=list)  # the training loss at each step
    seconds: float = 0.0


class _Dequant(nn.Module):
    """A quantized layer's weight from fixed codes and tuned scales (the parametrization)."""

    def __init__(self, layer: QuantLayer, form: Mapping[str, torch.Tensor], bits: int, module: nn.Module, device: torch.device):
        super().__init__()
        codes = unpack(form["qweight"].to(device), bits, layer.rows * layer.cols).reshape(layer.rows, layer.cols).to(torch.float32)
        groups = form["scales"].shape[1]
        width = groups * layer.group_size
        codes = nn.functional.pad(codes, (0, width - layer.cols)).reshape(layer.rows, groups, layer.group_size)
        offset = form["zeros"].to(device, torch.float32)[..., None] if "zeros" in form else torch.full((1, 1, 1), float(2 ** (bits - 1)), device=device)
        self.register_buffer("centred", codes - offset)  # q − offset, fixed
        self.register_buffer("scale", form["scales"].to(device, torch.float32))
        self.gain = nn.Parameter(torch.zeros_like(self.scale))
        self.cols = layer.cols
        self.shape = tuple(module.weight.shape)
        self.transposed = Conv1D is not None and isinstance(module, Conv1D)  # GPT-2 keeps (in, out)

    def scales(self) -> torch.Tensor:
        return self.scale * torch.exp(self.gain)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        matrix = (self.scales()[..., None] * self.centred).reshape(self.centred.shape[0], -1)[:, : self.cols]
        return matrix.t() if self.transposed else matrix.reshape(self.shape)


def hidden_distance(hidden: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over blocks of each block output's relative squared error to the FP model's,
    ``Σ (h − r)² / Σ r²`` over the tokens ``mask`` keeps (all without one).

    >>> r = [torch.ones(1, 2, 4)]
    >>> float(hidden_distance(r, r)), float(hidden_distance([torch.zeros(1, 2, 4)], r))
    (0.0, 1.0)
    """
    terms = []
    for h, r in zip(hidden, reference, strict=True):
        keep = torch.ones(h.shape[:-1], device=h.device) if mask is None else mask.to(h.device, torch.float32)
        keep = keep[..., None]
        terms.append(((h - r) ** 2 * keep).sum() / ((r**2) * keep).sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(terms).mean()


def decode_into(model: nn.Module, table: LayerTable, widths: Mapping[str, Width], forms: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Give each layer of ``forms`` in ``model`` the decoded weight of its packed form at its menu
    entry ``widths[layer]`` (as the bank does)."""
    from mpsearch.quant.bank import Candidate

    modules = dict(model.named_modules(remove_duplicate=False))
    with torch.no_grad():
        for name in forms:
            layer, _scheme, bits = table.at(name, widths[name])
            module = modules[name]
            decoded = Candidate(bits=bits, packed=dict(forms[name]), nbytes=0, mse=math.nan, sqnr=math.nan).dequantized(layer)
            module.weight.data.copy_(module_layout(module, decoded.to(module.weight.device)))
    return model


def repair(
    model: nn.Module,
    table: LayerTable,
    bits: Mapping[str, Width],
    forms: Mapping[str, Mapping[str, torch.Tensor]],
    step_loss: Callable[[nn.Module, int], torch.Tensor],
    n_batches: int,
    steps: int,
    seed: int = 0,
    lr: float = 1e-3,
    schedule: str = "constant",
    progress: bool = False,
) -> Repaired:
    """Tune ``model`` (an FP model of ``table``, changed in place) from the plan's ``forms``;
    ``step_loss(model, i)`` is the loss of calibration batch ``i``; ``schedule`` is "constant" or
    "cosine" (``lr`` down to 0 over the steps). See the module docstring."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    torch.manual_seed(seed)
    modules = dict(model.named_modules(remove_duplicate=False))
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    gains: dict[str, _Dequant] = {}
    tuned: dict[str, nn.Parameter] = {}
    for name in table.names:
        layer, _scheme, b = table.at(name, bits[name])  # a scheme option: its own group size
        module = modules[layer.name]
        if b == FLOAT_BITS:
            with torch.no_grad():
                module.weight.copy_(module_layout(module, forms[layer.name]["weight"].to(device, torch.float32)))
            continue
        dequant = _Dequant(layer, forms[layer.name], b, module, device)
        parametrize.register_parametrization(module, "weight", dequant, unsafe=True)
        gains[layer.name] = dequant
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            tuned[f"{layer.name}.bias"] = bias
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
            for pname, p in module.named_parameters(recurse=False):
                tuned[f"{name}.{pname}"] = p
    for p in tuned.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(
        [{"params": [d.gain for d in gains.values()], "lr": lr}, {"params": list(tuned.values()), "lr": lr / 10}]
    )
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1)) if schedule == "cosine" else None
    curve = []
    model.train(False)  # no dropout: the tuning sees the model as it runs
    for step in tqdm(range(steps), desc="repair", unit="step", disable=not progress, leave=False):
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(model, step % n_batches)
        if not torch.isfinite(loss):
            break  # left where it was: the caller compares the losses and keeps the better
        loss.backward()
        optimizer.step()
        if decay is not None:
            decay.step()
        curve.append(float(loss.detach()))
    out_forms = {}
    with torch.no_grad():
        for name, d in gains.items():
            form = dict(forms[name])
            dtype = form["scales"].dtype
            scales = d.scales().to(dtype)
            form["scales"] = torch.where(scales > 0, scales, torch.full_like(scales, torch.finfo(dtype).tiny)).cpu()
            out_forms[name] = form
        for name in gains:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)
    for layer in table.layers:
        if layer.name not in out_forms:
            out_forms[layer.name] = dict(forms[layer.name])
    state = model.state_dict()
    tensors = {name: state[name].detach().cpu().clone() for name in tuned if name in state}
    for p in model.parameters():
        p.requires_grad_(False)
    return Repaired(out_forms, tensors, curve, time.perf_counter() - start)
