"""The input second moment ``XᵀX`` of every quantizable layer, from one calibration pass.

Forward hooks on the layers collect, for each layer, the rows its weight matrix
multiplies: the last dimension of a Linear's (or GPT-2 Conv1D's) input, or the unfolded
patches (``in_channels·kernel`` values) of a convolution's input. Positions that the
batch's ``attention_mask`` marks as padding are left out: they are not text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mpsearch.quant.layers import Conv1D, LayerTable, QuantLayer


@dataclass
class Moment:
    """``xtx = Σ xᵀx`` over ``count`` input rows of one layer."""

    xtx: torch.Tensor
    count: int = 0


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer's inputs cannot be laid out as rows of its weight matrix, if they cannot."""
    if isinstance(module, nn.Embedding):
        return "an embedding's inputs are token ids, not vectors"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return None


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input ``x`` as an (N × cols) matrix of the vectors its weight multiplies."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding == "valid":
        padding = (0,) * len(module.kernel_size)
    else:
        padding = getattr(module, "padding", None)
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if isinstance(module, nn.Conv1d):
        patches = F.unfold(
            x.unsqueeze(2),
            (1, module.kernel_size[0]),
            (1, module.dilation[0]),
            (0, padding[0]),
            (1, module.stride[0]),
        )
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        return x.reshape(-1, x.shape[-1])
    raise TypeError(f"no input layout for {type(module).__name__}")


def input_moments(
    model: nn.Module,
    table: LayerTable,
    batches: Iterable[Mapping[str, torch.Tensor]],
    forward: Callable[[nn.Module, Mapping[str, torch.Tensor]], object],
    progress: bool = False,
    layers: Sequence[QuantLayer] | None = None,
    share: bool = True,
    stop_early: bool = False,
) -> dict[str, Moment]:
    """Run ``forward(model, batch)`` over ``batches`` and return each layer's :class:`Moment`
    (of ``layers``, by default every layer of the table).

    Tied layers (one weight, several modules) pool the inputs of every module that uses
    the weight. Layers :func:`unsupported_reason` rejects get no moment. With ``share``, layers
    fed the same tensor object in every batch hold one shared :class:`Moment`. With
    ``stop_early``, a batch's forward is cut short once every hooked module has run (the rest of
    the model cannot change their inputs): a pass over the first layers costs a fraction of one.
    """
    from tqdm.auto import tqdm

    batches = list(batches)  # a second pass may be needed
    modules = dict(model.named_modules(remove_duplicate=False))
    moments: dict[str, Moment] = {}
    mask: list[torch.Tensor | None] = [None]
    handles = []
    # Layers fed the very same tensor (q/k/v of one attention, gate/up of one MLP) share one
    # Moment: the input of the layer that ran last is held, and a layer handed that same object
    # reuses its moment instead of adding a copy of it (half the XᵀX memory and work in a LLaMA).
    last: list = [None, None]  # [input tensor, the layer whose moment took it]
    shared: set[str] = set()  # layers whose moment is another layer's
    fired: set[int] = set()  # hooked modules that ran in this batch (stop_early)
    hooked: set[int] = set()

    def hook_for(layer_name: str):
        def hook(module, inputs, _output):
            _take(module, inputs)
            if stop_early:
                fired.add(id(module))
                if fired == hooked:
                    raise _Captured

        def _take(module, inputs):
            raw = inputs[0]  # the object itself: detach() would make a new one each call
            moment = moments.get(layer_name)
            if share and raw is last[0] and last[1] != layer_name and (moment is None or layer_name in shared):
                partner = moments[last[1]]
                if moment is None or moment is partner:
                    moments[layer_name] = partner
                    shared.add(layer_name)
                    return
            if layer_name in shared:  # fed apart from its partner after all: the pass starts again, unshared
                raise _Unshared
            x, m = raw.detach(), mask[0]
            if m is not None and x.dim() == m.dim() + 1 and x.shape[: m.dim()] == m.shape:
                x = x[m.bool()]  # (tokens, features): padding dropped
            rows = input_rows(module, x).to(torch.float32)
            if moment is None:
                moment = moments[layer_name] = Moment(torch.zeros(rows.shape[1], rows.shape[1], device=rows.device))
            moment.xtx.addmm_(rows.T, rows)
            moment.count += rows.shape[0]
            last[0], last[1] = raw, layer_name

        return hook

    try:
        for layer in table.layers if layers is None else layers:
            for name in (layer.name, *layer.aliases):
                module = modules[name]
                # One module object reached by two names is hooked once: it runs once per call.
                if id(module) not in hooked and unsupported_reason(module) is None:
                    hooked.add(id(module))
                    handles.append(module.register_forward_hook(hook_for(layer.name)))
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration pass", unit="batch", disable=not progress, leave=False):
                mask[0] = batch.get("attention_mask")
                fired.clear()
                try:
                    forward(model, batch)
                except _Captured:
                    pass
                last[0] = None
    except _Unshared:
        moments = None
    finally:
        for handle in handles:
            handle.remove()
    if moments is None:
        return input_moments(model, table, batches, forward, progress, layers, share=False, stop_early=stop_early)
    return moments


class _Captured(Exception):
    """Every hooked module has run in this batch: the rest of the forward is not needed."""


class _Unshared(Exception):
    """Two layers that shared an input in one batch were fed different ones in another."""
