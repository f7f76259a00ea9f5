"""Giving memory back between the phases of a run.

A phase that allocates and frees many large tensors (building the bank, a backward pass) leaves
the C allocator holding freed memory that the process's resident size still counts, and the next
phase's peak sits on top of it. :func:`trim` hands it back: glibc's ``malloc_trim`` on Linux, the
caching allocator's free blocks on CUDA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim(collect: bool = True) -> None:
    """Collect garbage and return freed memory to the system (where the platform allows).

    ``collect=False`` skips the garbage collection: a full one walks every Python object (about
    0.35 s beside a loaded LLM and transformers), which a loop over hundreds of layers cannot pay
    each time; tensors without reference cycles are freed without it.

    >>> trim()
    """
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
