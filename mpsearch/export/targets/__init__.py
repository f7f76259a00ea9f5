"""Deployment targets: the formats an export is written in besides mpsearch's own.

* ``mpsearch`` (always written): ``model.safetensors`` in mpsearch's packing, ``plan.json``,
  ``FORMAT.md``, the llama.cpp tensor-type file; :func:`mpsearch.load_quantized` runs it.
* ``compressed-tensors``: a Hugging Face model folder that transformers loads with the
  ``compressed-tensors`` package (:mod:`.compressed_tensors`).

:mod:`.llama_cpp` builds and runs llama.cpp (``mpsearch toolchain llama.cpp``), the runtime a
GGUF target will be checked with; a ``gguf`` target that searches over llama.cpp's own types is
not built yet.
"""

TARGETS = ("mpsearch", "compressed-tensors")
