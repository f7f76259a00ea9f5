"""Bit packing of integer codes into uint8, and back, bit-exactly.

The layout, precise enough to decode without mpsearch:

* A layer's codes are unsigned integers in ``[0, 2**b - 1]``, one per weight, taken in
  row-major order of the (rows = outputs, cols = inputs) weight matrix: code ``i`` is
  the weight at row ``i // cols``, column ``i % cols``. There is no padding between rows.
* The codes form one little-endian bit stream of ``n·b`` bits: code ``i`` occupies
  stream bits ``i·b … i·b + b − 1``, its least significant bit first.
* Stream bit ``j`` is bit ``j % 8`` (value ``1 << (j % 8)``) of byte ``j // 8``.
* The stream is ``ceil(n·b / 8)`` bytes long; unused high bits of the last byte are 0.

So at 4 bits byte ``k`` is ``code[2k] | code[2k+1] << 4``; at 2 bits it holds codes
``4k … 4k+3`` from its low bits up; at 8 bits the bytes are the codes; at 3 bits a code
may straddle two bytes (code 2 takes bits 6–7 of byte 0 and bit 0 of byte 1).

>>> codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
>>> pack(codes, 3).tolist()
[209, 88, 31]
>>> unpack(pack(codes, 3), 3, 8).tolist()
[1, 2, 3, 4, 5, 6, 7, 0]
"""

from __future__ import annotations

import math

import torch

PACKED_BITS = (2, 3, 4, 8)


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, row-major) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, device=flat.device, dtype=torch.uint8)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # n·b bits, LSB of each code first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of a packed stream, as a flat uint8 tensor.

    This runs in every forward of a loaded model, so it reads whole bytes rather than
    single bits: at 2 and 4 bits each byte holds ``8 // b`` whole codes; at 3 bits every
    3 bytes hold exactly 8 codes, read as one 24-bit little-endian word.
    """
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {n} codes of {bits} bits")
    flat = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=flat.device, dtype=torch.uint8)
        return ((flat[:, None] >> shifts) & mask).reshape(-1)[:n]
    pad = (-flat.numel()) % bits
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    chunk = flat.reshape(-1, bits).to(torch.int32)
    word = chunk[:, 0]
    for j in range(1, bits):
        word = word | (chunk[:, j] << (8 * j))
    shifts = torch.arange(0, 8 * bits, bits, device=flat.device, dtype=torch.int32)
    return ((word[:, None] >> shifts) & mask).reshape(-1)[:n].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise ValueError(f"only {PACKED_BITS} bit codes are packed, got {bits}")
