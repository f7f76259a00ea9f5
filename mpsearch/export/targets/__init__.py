"""Deployment targets: the formats an export is written in besides mpsearch's own.

* ``mpsearch`` (always written): ``model.safetensors`` in mpsearch's packing, ``plan.json``,
  ``FORMAT.md``, the llama.cpp tensor-type file; :func:`mpsearch.load_quantized` runs it.
* ``compressed-tensors``: a Hugging Face model folder that transformers loads with the
  ``compressed-tensors`` package (:mod:`.compressed_tensors`).
"""

TARGETS = ("mpsearch", "compressed-tensors")
