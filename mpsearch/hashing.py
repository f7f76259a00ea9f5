"""Content hashes of tensors, models and batches: the keys caches and stored results are valid for."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import torch


def update_tensor(h, name: str, t: torch.Tensor) -> None:
    """Feed ``t``'s name, dtype, shape and bytes to the hash ``h``."""
    t = t.detach().contiguous().cpu()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_digest(model: torch.nn.Module) -> str:
    """A hash of every state-dict tensor of ``model``.

    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> model_digest(a) == model_digest(a), model_digest(a) == model_digest(b)
    (True, False)
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        update_tensor(h, name, t)
    return h.hexdigest()


def batches_digest(batches: Iterable[Mapping[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for i, batch in enumerate(batches):
        for name in sorted(batch):
            update_tensor(h, f"batch{i}.{name}", batch[name])
    return h.hexdigest()


def json_digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
