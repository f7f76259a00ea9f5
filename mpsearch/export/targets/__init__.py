"""Deployment targets: the formats an export is written in besides mpsearch's own.

* ``mpsearch`` (always written): ``model.safetensors`` in mpsearch's packing, ``plan.json``,
  ``FORMAT.md``, the llama.cpp tensor-type file; :func:`mpsearch.load_quantized` runs it.
* ``compressed-tensors`` (``export --target``): a Hugging Face model folder that transformers
  loads with the ``compressed-tensors`` package (:mod:`.compressed_tensors`).
* ``gguf`` (a study's ``[target] format = "gguf"``, not an export option: its candidates are
  llama.cpp's own, :mod:`mpsearch.quant.gguf`): one ``model.gguf`` holding the searched blocks,
  checked by llama.cpp (:mod:`.gguf`).

:mod:`mpsearch.quant.llama_cpp` builds and runs llama.cpp (``mpsearch toolchain llama.cpp``).
"""

TARGETS = ("mpsearch", "compressed-tensors")
