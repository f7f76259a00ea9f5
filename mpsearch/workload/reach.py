"""Layers the loss cannot see: those whose output reaches no term of the study's loss.

Such a layer has sensitivity exactly zero under every method (MiniLM's ``pooler.dense`` under the
default mean-pooled embedding loss: the loss reads ``last_hidden_state``, the pooler only feeds
``pooler_output``). A search would give it the smallest width for free, and a user who reads the
output it feeds would get a degraded model without a word, so the layer table names these layers
and the spec decides what happens to them (``layers.unseen``).

The test is one forward and one backward pass on the first calibration batch. Each layer's output
gets a small fixed nudge plus a zero tensor autograd tracks; the loss's gradient with respect to
that tensor is the gradient with respect to the layer's output. The nudge matters: at the FP model
a distillation loss sits at its minimum, where every gradient is zero. Off it, a layer the loss
reads has a non-zero gradient; one whose output never reaches the loss has none at all. A loss
with no gradient (``error-rate``'s argmax, a user's loss that detaches) names no layer.
"""

from __future__ import annotations

from typing import Sequence

import torch

NUDGE = 1e-2  # of each output's standard deviation


def unseen_layers(workload, names: Sequence[str]) -> list[str]:
    """The layers among ``names`` (module names of the workload's model) that the loss cannot see."""
    if not workload.loss_fn.differentiable:  # an argmax loss has no gradient anywhere: nothing can be told apart
        return []
    model = workload.fp_model()
    modules = dict(model.named_modules())
    probes: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    draws = torch.Generator().manual_seed(0)

    def nudged(name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return output
            probe = torch.zeros_like(output, requires_grad=True)
            probes[name].append(probe)
            scale = output.detach().float().std().nan_to_num().item() * NUDGE + 1e-6
            noise = (torch.randn(output.shape, generator=draws) * scale).to(output)
            return output + noise + probe

        return hook

    handles = [modules[name].register_forward_hook(nudged(name)) for name in names]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)  # gradients of the outputs only: no weight gradients are kept
        with torch.enable_grad():
            total, _ = workload.loss_terms(model, "calibration", 0)
            if not total.requires_grad:  # a user's loss that detaches: no layer can be told apart either
                return []
            total.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return [name for name in names if all(p.grad is None or not bool(p.grad.any()) for p in probes[name])]
