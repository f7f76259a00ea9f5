"""Block-wise learned rounding of a chosen plan (``export --refine blockwise``).

After sequential GPTQ (:mod:`mpsearch.quant.refine`) each layer's codes are fixed by a rule that
looks at one layer at a time. Here the model's blocks (the transformer layers: the children of
the ``ModuleList`` that holds the most quantized layers) are tuned one after another, the way
AutoRound does it: block ``i`` is fed what blocks ``0 … i−1``, already tuned and quantized, give
it, and its output is pulled towards the FP model's output of the same block on the same examples
(the relative squared error over the tokens the attention mask keeps). The first block's inputs
are captured once from each model; after that each block's outputs become the next block's
hidden states, with the same mask and positions, so the model is never run up to a block again.
Both models' hidden states on every tuning example are held (for an LLM, examples × tokens ×
hidden size floats twice over). What is learned, for every quantized layer of the block:

* a rounding offset ``v`` a weight, bounded in [−0.5, 0.5]: the code becomes
  ``q + round(x + v) − round(x)`` (``q`` the plan's code, ``x`` the FP weight's place on the
  layer's grid), so ``v = 0`` is the plan itself and a code moves at most one level;
* a gain ``exp(g)`` a group on the stored scale, as in :mod:`mpsearch.quant.repair`.

Both are trained by Adam, the offsets at ``lr`` (default 1e-2) and the gains at a tenth of it,
each rate decaying linearly to 0 over the block's steps, with the rounding passed straight
through. AutoRound's signed gradient descent (a step of ``±lr`` a weight) was this module's first
rule: on the default study's 4.125 bpw plan, 200 steps a block on 2048 examples, it ended at
evaluation and test losses of 0.00656 and 0.00632, Adam at 0.00582 and 0.00581. A block keeps what it learned only if its loss over all the tuning
examples is lower than the plan's (every ``v`` and ``g`` at 0), so no block leaves worse off on
the data it was tuned on. A block's target is dense (every token, every channel) and
local, which is what an end-to-end tuning of the codes lacked: there the gradient of one pooled
embedding a sentence moved codes of every layer at once and lost what GPTQ had put in them.

The result is each layer's packed form with its new codes and scales, in the plan's layout and
bytes, for the caller to keep or not.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from mpsearch.plan import Width
from mpsearch.quant.apply import module_layout
from mpsearch.quant.layers import Conv1D, LayerTable, QuantLayer, weight_matrix
from mpsearch.quant.packing import pack, unpack
from mpsearch.quant.repair import decode_into
from mpsearch.quant.scheme import FLOAT_BITS


_RATE = 1e-2  # Adam's rate for the rounding offsets; the scale gains take a tenth of it


class _Stop(Exception):
    """Raised by a hook once the block it watches has given what was asked of it."""


class _Rounded(nn.Module):
    """A quantized layer's weight from tunable roundings and scale gains (the parametrization)."""

    def __init__(self, layer: QuantLayer, form: Mapping[str, torch.Tensor], bits: int, fp: torch.Tensor, module: nn.Module):
        super().__init__()
        device = fp.device
        groups = form["scales"].shape[1]
        width = groups * layer.group_size
        shape = (layer.rows, groups, layer.group_size)
        codes = unpack(form["qweight"].to(device), bits, layer.n).reshape(layer.rows, layer.cols).to(torch.float32)
        codes = nn.functional.pad(codes, (0, width - layer.cols)).reshape(shape)
        offset = form["zeros"].to(device, torch.float32)[..., None] if "zeros" in form else torch.full((1, 1, 1), float(2 ** (bits - 1)), device=device)
        scale = form["scales"].to(device, torch.float32)
        x = nn.functional.pad(fp, (0, width - layer.cols)).reshape(shape) / scale[..., None] + offset
        self.register_buffer("x", x)
        self.register_buffer("base", codes - torch.round(x))  # code = base + round(x + v): the plan's at v = 0
        self.register_buffer("offset", offset)
        self.register_buffer("scale", scale)
        self.v = nn.Parameter(torch.zeros_like(x))
        self.gain = nn.Parameter(torch.zeros_like(scale))
        self.top = float(2**bits - 1)
        self.bits = bits
        self.cols = layer.cols
        self.shape = tuple(module.weight.shape)
        self.transposed = Conv1D is not None and isinstance(module, Conv1D)

    def codes(self) -> torch.Tensor:
        moved = self.x + self.v
        rounded = moved + (torch.round(moved) - moved).detach()  # straight through
        return torch.clamp(self.base + rounded, 0.0, self.top)

    def scales(self) -> torch.Tensor:
        return self.scale * torch.exp(self.gain)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        w = self.scales()[..., None] * (self.codes() - self.offset)
        matrix = w.reshape(w.shape[0], -1)[:, : self.cols]
        return matrix.t() if self.transposed else matrix.reshape(self.shape)

    def form(self, old: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            codes = torch.round(self.codes()).reshape(self.x.shape[0], -1)[:, : self.cols].to(torch.uint8)
            dtype = old["scales"].dtype
            scales = self.scales().to(dtype)
            scales = torch.where(scales > 0, scales, torch.full_like(scales, torch.finfo(dtype).tiny))
        return {**old, "qweight": pack(codes, self.bits).cpu(), "scales": scales.cpu()}


def _keep_if_better(params: Sequence[nn.Parameter], total: Callable[[], float]) -> None:
    """Leave ``params`` as tuned if the block's loss over every tuning batch (``total()``) is
    lower than with them all at 0 (the plan's codes and scales); otherwise set them to 0."""
    with torch.no_grad():
        tuned = total()
        kept = [p.detach().clone() for p in params]
        for p in params:
            p.zero_()
        if tuned < total():
            for p, k in zip(params, kept):
                p.copy_(k)


def blocks_of(model: nn.Module, table: LayerTable) -> list[tuple[str, nn.Module]]:
    """The model's blocks in forward order: the children of the ``ModuleList`` that holds the
    most quantized layers (a transformer's layers), or none."""
    best, count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            n = sum(1 for layer in table.layers if layer.name.startswith(f"{name}."))
            if n > count:
                best, count = name, n
    if best is None:
        return []
    lst = model.get_submodule(best)
    return [(f"{best}.{i}", block) for i, block in enumerate(lst)]


Inputs = tuple[tuple, dict]  # a block's positional and keyword arguments for one batch


def block_inputs(model: nn.Module, block: nn.Module, batch: Mapping[str, torch.Tensor], run: Callable) -> Inputs:
    """What ``block`` is called with when ``run(model, batch)`` runs (the model stops there)."""
    got = {}

    def before(_module, args, kwargs):
        got["input"] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        raise _Stop

    handle = block.register_forward_pre_hook(before, with_kwargs=True)
    try:
        with torch.no_grad():
            run(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["input"]


def block_output(block: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The hidden states ``block`` gives (its first output)."""
    args, kwargs = inputs
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def next_inputs(inputs: Inputs, hidden: torch.Tensor) -> Inputs:
    """The next block's inputs: this block's, with ``hidden`` for the hidden states (the first
    positional argument, or ``hidden_states``). Every block of a transformers model takes the same
    mask and positions, which is what lets the blocks be fed one after another without running
    the model up to each (AutoRound feeds them so too)."""
    args, kwargs = inputs
    if args:
        return (hidden.detach(), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden.detach()}


def _distance(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    keep = torch.ones(out.shape[:-1], device=out.device) if mask is None else mask.to(out.device, torch.float32)
    keep = keep[..., None]
    return ((out - target) ** 2 * keep).sum() / ((target**2) * keep).sum().clamp_min(torch.finfo(torch.float32).tiny)


def blockwise_forms(
    model: nn.Module,
    fp: nn.Module,
    table: LayerTable,
    bits: Mapping[str, Width],
    forms: Mapping[str, Mapping[str, torch.Tensor]],
    batches: Sequence[Mapping[str, torch.Tensor]],
    run: Callable[[nn.Module, Mapping[str, torch.Tensor]], object],
    steps: int,
    lr: float = _RATE,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Each layer's packed form after block-wise learned rounding (see the module docstring),
    from the plan's ``forms``; a layer outside the blocks keeps its own. ``model`` is the FP model of ``table`` and ends holding
    the tuned weights (decoded); ``fp`` is an untouched FP model; ``run(model, batch)`` runs one."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    out_forms = {name: dict(form) for name, form in forms.items()}
    decode_into(model, table, bits, out_forms)
    modules = dict(model.named_modules(remove_duplicate=False))
    for p in model.parameters():
        p.requires_grad_(False)
    model.train(False)
    fp.train(False)
    fp_modules = dict(fp.named_modules(remove_duplicate=False))
    blocks = blocks_of(model, table)
    bar = tqdm(total=len(blocks) * steps, desc="block-wise rounding", unit="step", disable=not progress, leave=False)
    if blocks:
        inputs = [block_inputs(model, blocks[0][1], b, run) for b in batches]  # the quantized model's, block by block
        fp_inputs = [block_inputs(fp, fp_modules[blocks[0][0]], b, run) for b in batches]
    for name, block in blocks:
        with torch.no_grad():
            targets = [block_output(fp_modules[name], i) for i in fp_inputs]
        inside = [layer for layer in table.layers if layer.name.startswith(f"{name}.") and table.at(layer.name, bits[layer.name])[2] != FLOAT_BITS]
        tuned: dict[str, _Rounded] = {}
        for layer in inside:
            at, _scheme, b = table.at(layer.name, bits[layer.name])
            module = modules[layer.name]
            rounded = _Rounded(at, out_forms[layer.name], b, weight_matrix(fp_modules[layer.name]).detach().to(torch.float32), module)
            parametrize.register_parametrization(module, "weight", rounded, unsafe=True)
            tuned[layer.name] = rounded
        params = [p for r in tuned.values() for p in (r.v, r.gain)]
        if tuned and steps:
            offsets, gains = [r.v for r in tuned.values()], [r.gain for r in tuned.values()]
            optimizer = torch.optim.Adam([{"params": offsets, "lr": lr}, {"params": gains, "lr": lr / 10}])
            decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)

        def block_loss(i: int) -> torch.Tensor:
            return _distance(block_output(block, inputs[i]), targets[i], batches[i].get("attention_mask"))

        for step in range(steps if tuned else 0):
            optimizer.zero_grad(set_to_none=True)
            block_loss(step % len(batches)).backward()
            optimizer.step()
            decay.step()
            with torch.no_grad():
                for r in tuned.values():
                    r.v.clamp_(-0.5, 0.5)
            bar.update()
        if steps and tuned:
            _keep_if_better(params, lambda: sum(float(block_loss(i)) for i in range(len(batches))))
        for layer_name, rounded in tuned.items():
            out_forms[layer_name] = rounded.form(out_forms[layer_name])
            parametrize.remove_parametrizations(modules[layer_name], "weight", leave_parametrized=False)
        decode_into(model, table, bits, {n: out_forms[n] for n in tuned})
        bar.update(0 if tuned else steps)
        with torch.no_grad():  # the next block's inputs: this block's outputs, quantized as it now is, and the FP model's
            inputs = [next_inputs(i, block_output(block, i)) for i in inputs]
        fp_inputs = [next_inputs(i, t) for i, t in zip(fp_inputs, targets)]
        del targets, tuned
    bar.close()
    return out_forms
