"""Bit packing round-trips bit-exactly, and the stream layout is the documented one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpsearch.quant.packing import pack, packed_nbytes, unpack


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 9), cols=st.integers(1, 67), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trips_any_shape(bits, rows, cols, seed):
    codes = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(rows * cols * bits / 8) == packed_nbytes(rows * cols, bits)
    assert torch.equal(unpack(packed, bits, rows * cols).reshape(rows, cols), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layout_is_a_little_endian_bit_stream(bits):
    """Decode with plain Python integers, as a third party would from the docstring."""
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    stream = int.from_bytes(bytes(pack(codes, bits).tolist()), "little")
    decoded = [(stream >> (i * bits)) & (2**bits - 1) for i in range(37)]
    assert decoded == codes.tolist()
    assert stream >> (37 * bits) == 0  # the padding bits are zero


def test_four_and_two_bit_bytes():
    assert pack(torch.tensor([1, 2, 15, 0]), 4).tolist() == [1 | 2 << 4, 15]
    assert pack(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]


def test_a_stream_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack(torch.zeros(3, dtype=torch.uint8), 3, 9)
