"""Sequential GPTQ: the chosen plan re-quantized in forward order (``export --refine sequential``).

The candidate bank quantizes every layer from the FP model's inputs. That is right for the
search, where a candidate must not depend on the other layers' bits, but it leaves out the
error compensation GPTQ was made for: a layer fed by already-quantized layers sees other
inputs than the FP model gives it. Here each layer of the plan, in the table's (forward)
order, gets its ``XᵀX`` from the model whose earlier layers already hold their refined
quantized weights, is quantized by GPTQ at its planned bits (from its FP weight), and then
holds that quantized weight for the layers after it.

A calibration pass of the whole model per layer would cost as many forwards as the model has
layers (half that, each pass stopping once its layer has ran): on SmolLM2's 210 layers, over
20 minutes on 2 cores before any GPTQ. So a layer inside one of the model's blocks (the
transformer layers, :func:`~mpsearch.quant.blockwise.blocks_of`) gets its inputs by running its
block alone, from that block's inputs on every calibration batch, held: the first block's are
captured from the model once, and each block's outputs, with its layers already refined, are the
next one's. A layer's pass then costs a fraction of one block, and the inputs are the very ones
the whole model would give it (``by_blocks=False`` takes the model's own passes, for comparison).
Layers of a block fed the very same tensor (query, key and value; gate and up) share one pass:
quantizing the first cannot change what the others are fed, so their ``XᵀX`` is taken with its.
Layers outside the blocks, and a weight shared beyond one block, take the model's own pass. A 16-bit layer is rounded to
fp16 and a layer whose inputs cannot be collected keeps rtn, as in the bank.

The result is each layer's packed form, in the bank's layout, so the export writes it like
any candidate. Whether it is kept is the caller's choice: the export keeps it only when the
evaluation loss improves.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from mpsearch.quant.apply import quantizer
from mpsearch.quant.bank import packed_form
from mpsearch.quant.blockwise import block_inputs, block_output, blocks_of, next_inputs
from mpsearch.quant.calibration import input_moments, unsupported_reason
from mpsearch.quant.gptq import Curvature
from mpsearch.quant.layers import LayerTable, weight_matrix
from mpsearch.quant.repair import decode_into
from mpsearch.plan import Width, bits_of
from mpsearch.quant.scheme import FLOAT_BITS


def sequential_forms(
    model: nn.Module,
    table: LayerTable,
    bits: Mapping[str, Width],
    batches: Sequence[Mapping[str, torch.Tensor]],
    forward: Callable[[nn.Module, Mapping[str, torch.Tensor]], object],
    progress: bool = False,
    by_blocks: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Each layer's packed form, refined in forward order (see the module docstring), and the
    method that made it (``gptq``; ``rtn`` where the layer's inputs cannot be collected; ``fp16``).

    ``model`` is an FP model of ``table``; it is changed in place and ends holding the refined
    weights (decoded), so the caller can score it at once.
    """
    from tqdm.auto import tqdm

    gptq = quantizer("gptq")
    modules = dict(model.named_modules(remove_duplicate=False))
    scheme = table.scheme
    forms: dict[str, dict[str, torch.Tensor]] = {}
    methods: dict[str, str] = {}
    batches = list(batches)
    blocks = dict(blocks_of(model, table)) if by_blocks else {}
    order = list(blocks)
    block_of = {layer.name: next((b for b in blocks if layer.name.startswith(f"{b}.")), None) for layer in table.layers}
    fed: dict = {"block": None, "inputs": None}  # the block being refined and its inputs, batch by batch
    index = {id(b): i for i, b in enumerate(batches)}
    held: dict = {}  # moments taken by an earlier layer's pass for the later layers fed alike

    def moment_of(layer):
        name = block_of[layer.name]
        if name is None or layer.aliases:  # a layer outside the blocks, or a weight shared beyond one: the model's own pass
            return input_moments(model, table, batches, forward, layers=[layer], share=False, stop_early=not layer.aliases).get(layer.name)
        if fed["block"] is None:  # the first block reached: its inputs from the model itself
            fed["block"], fed["inputs"] = name, [block_inputs(model, blocks[name], b, forward) for b in batches]
        while fed["block"] != name:  # each block's outputs, quantized as it now is, are the next one's inputs
            with torch.no_grad():
                fed["inputs"] = [next_inputs(i, block_output(blocks[fed["block"]], i)) for i in fed["inputs"]]
            fed["block"] = order[order.index(fed["block"]) + 1]
        if layer.name in held:
            return held.pop(layer.name)
        inputs, block = fed["inputs"], blocks[name]
        group = [layer, *fed_alike(layer, block, inputs[0])]
        moments = input_moments(model, table, batches, lambda _m, b: block_output(block, inputs[index[id(b)]]), layers=group, share=True, stop_early=True)
        held.update({g.name: moments[g.name] for g in group[1:] if g.name in moments})
        return moments.get(layer.name)

    def fed_alike(layer, block, inputs):
        """The later layers of ``layer``'s block fed the very tensor it is fed (q/k/v, gate/up),
        on one batch: quantizing ``layer`` cannot change their inputs, so one pass serves them all."""
        later = [t for t in table.layers[table.layers.index(layer) + 1 :] if block_of[t.name] == block_of[layer.name] and not t.aliases and bits_of(bits[t.name]) != FLOAT_BITS]
        seen: dict[str, torch.Tensor] = {}
        handles = [modules[t.name].register_forward_pre_hook(lambda _m, args, n=t.name: seen.setdefault(n, args[0])) for t in (layer, *later)]
        try:
            with torch.no_grad():
                block_output(block, inputs)
        finally:
            for handle in handles:
                handle.remove()
        return [t for t in later if layer.name in seen and seen.get(t.name) is seen[layer.name]]

    for layer in tqdm(table.layers, desc="sequential gptq", unit="layer", disable=not progress, leave=False):
        module = modules[layer.name]
        b = bits_of(bits[layer.name])
        curvature = None
        if b != FLOAT_BITS and unsupported_reason(module) is None:
            moment = moment_of(layer)
            if moment is not None:
                curvature = Curvature.from_moment(moment.xtx, scheme.damp, scheme.act_order)
        w = weight_matrix(module).detach().to(torch.float32)
        form = packed_form(gptq.quantize, w, bits[layer.name], layer, table, curvature)
        forms[layer.name] = {k: t.cpu() for k, t in form.items()}
        methods[layer.name] = "fp16" if b == FLOAT_BITS else "gptq" if curvature is not None else "rtn"
        decode_into(model, table, bits, {layer.name: form})
        del w, curvature
    return forms, methods
