"""The GGUF reader against the ``gguf`` package's own, on the real SmolLM2 file; damaged files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from mpsearch.errors import MPSearchError
from mpsearch.quant.gguf_file import read_gguf
from mpsearch.workload.models import smollm2_gguf


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_gguf()


def test_it_reads_what_ggufs_own_reader_reads(smollm2):
    theirs = GGUFReader(str(smollm2))
    ours = read_gguf(smollm2)
    assert list(ours.tensors) == [t.name for t in theirs.tensors] and len(ours.tensors) == 272
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.tensor_type, mine.shape, mine.n_elements, mine.n_bytes, mine.data_offset) == (t.tensor_type, tuple(int(d) for d in t.shape), t.n_elements, t.n_bytes, t.data_offset)
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape and np.array_equal(mine.data.view(np.uint8), t.data.view(np.uint8))
    # Scalar and string fields alike; arrays (the vocabulary) are stepped over, not read.
    scalars = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.") and f.types[0] != GGUFValueType.ARRAY}
    assert ours.fields == pytest.approx(scalars) and "tokenizer.ggml.tokens" not in ours.fields
    assert ours.fields["general.architecture"] == "llama" and ours.version == 3


def test_a_cut_short_or_foreign_file_is_one_line_that_names_the_file_only(smollm2, tmp_path):
    whole = smollm2.read_bytes()
    for name, content, words in [
        ("half.gguf", whole[: len(whole) // 2], "is cut short: tensor"),  # the header is whole, the data is not
        ("header.gguf", whole[:5000], "is cut short or damaged"),  # cut inside the metadata
        ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "is not a GGUF file"),
        ("empty.gguf", b"", "cannot read the GGUF file"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MPSearchError) as error:
            read_gguf(path)
        message = str(error.value)
        assert words in message and name in message and str(tmp_path) not in message and "\n" not in message
