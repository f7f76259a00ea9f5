"""Data sources, the calibration/evaluation split, and fixed batches.

A data source turns ``data.source`` into :class:`Examples`: texts (with optional integer
labels) or a dict of tensors whose first dimension indexes examples. The split is
drawn once with the spec's seed, and the calibration and evaluation index sets are
disjoint by construction. Batches are built once and then reused by every
evaluation, so every trial sees exactly the same inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mpsearch.errors import WorkloadError
from mpsearch.registry import Registry
from mpsearch.workload.stdlib_docs import stdlib_paragraphs, stdlib_sentences

Batch = dict[str, torch.Tensor]


@dataclass
class Examples:
    """Either ``texts`` (tokenized later by the model's tokenizer) or ``tensors``."""

    texts: list[str] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return next(iter(self.tensors.values())).shape[0]

    def take(self, index: np.ndarray) -> "Examples":
        idx = torch.as_tensor(index, dtype=torch.long)
        return Examples(
            texts=[self.texts[i] for i in index] if self.texts is not None else None,
            tensors={k: v[idx] for k, v in self.tensors.items()} if self.tensors is not None else None,
            labels=self.labels[idx] if self.labels is not None else None,
        )


DataSource = Callable[[Path | None, Any], Examples]
DATA_SOURCES: Registry[DataSource] = Registry("data format")

_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".safetensors": "tensors", ".pt": "tensors", ".pth": "tensors"}


def data_format(source: str, fmt: str) -> str:
    """The registry entry for ``source``: explicit ``fmt``, else by name or file suffix."""
    if fmt != "auto":
        return fmt
    if source in BUILT_IN:
        return source
    try:
        return _SUFFIXES[Path(source).suffix.lower()]
    except KeyError:
        raise WorkloadError(
            f"data.source: cannot tell the format of {source!r} from its suffix; set data.format to text, jsonl or tensors"
        ) from None


def load_examples(source: str, data, resolve: Callable[[str], Path], field: str = "data.source") -> Examples:
    fmt = data_format(source, data.format)
    path = None if fmt in BUILT_IN else resolve(source)
    if path is not None and not path.is_file():
        raise WorkloadError(f"{field}: data file {str(path)!r} does not exist")
    try:
        examples = DATA_SOURCES.get(fmt)(path, data)
    except WorkloadError as e:
        raise WorkloadError(f"{field}: {e}") from None
    if len(examples) == 0:
        raise WorkloadError(f"{field}: {str(path or source)!r} holds no examples; it needs at least one")
    return examples


def split(data, resolve: Callable[[str], Path]) -> tuple[Examples, Examples, Examples]:
    """(calibration, evaluation, test), drawn with ``data.seed``; never overlapping.

    With one source, calibration takes the first ``data.calibration`` indices of a seeded
    permutation, evaluation the last ``data.evaluation`` and test the ``data.test`` just before
    those, so neither held-out set moves when the calibration size changes. With
    ``data.eval_source``, evaluation and test are drawn from it, apart. ``data.test`` unset takes
    as many as evaluation where the source has them, fewer (down to none) where it does not.
    """
    source = load_examples(data.source, data, resolve)
    n = len(source)
    perm = np.random.default_rng(data.seed).permutation(n)
    if data.eval_source is None:
        test = _test_size(data, n - data.calibration - data.evaluation)
        if data.calibration + data.evaluation + test > n:
            raise WorkloadError(
                f"data.calibration + data.evaluation + data.test = {data.calibration + data.evaluation + test} but {data.source!r} "
                f"has {n} examples; lower them or set data.eval_source"
            )
        held_out = perm[n - data.evaluation - test :]
        return source.take(perm[: data.calibration]), source.take(held_out[test:]), source.take(held_out[:test])
    evaluation = load_examples(data.eval_source, data, resolve, field="data.eval_source")
    test = _test_size(data, len(evaluation) - data.evaluation)
    for field, want, have in (
        ("data.calibration", data.calibration, n),
        ("data.evaluation + data.test", data.evaluation + test, len(evaluation)),
    ):
        if want > have:
            raise WorkloadError(f"{field} = {want} but its source has {have} examples; lower it")
    eval_perm = np.random.default_rng(data.seed + 1).permutation(len(evaluation))
    return (
        source.take(perm[: data.calibration]),
        evaluation.take(eval_perm[: data.evaluation]),
        evaluation.take(eval_perm[data.evaluation : data.evaluation + test]),
    )


def repair_examples(data, resolve: Callable[[str], Path], count: int) -> Examples:
    """The first ``count`` indices of the same seeded permutation as :func:`split`: the
    calibration split and the examples after it, never an evaluation or test example.

    >>> from types import SimpleNamespace as NS
    >>> data = NS(source="stdlib-docs", format="auto", seed=0, calibration=4, evaluation=4, test=None, eval_source=None)
    >>> calibration, _, _ = split(data, lambda p: p)
    >>> more = repair_examples(data, lambda p: p, 8)
    >>> len(more), more.take(np.arange(4)).texts == calibration.texts
    (8, True)
    """
    source = load_examples(data.source, data, resolve)
    n = len(source)
    perm = np.random.default_rng(data.seed).permutation(n)
    held_out = 0 if data.eval_source is not None else data.evaluation + _test_size(data, n - data.calibration - data.evaluation)
    if count > n - held_out:
        raise WorkloadError(
            f"export.repair_examples = {count} but {data.source!r} has {n - held_out} examples outside evaluation and test; lower it"
        )
    return source.take(perm[:count])


def _test_size(data, left: int) -> int:
    return data.test if data.test is not None else max(0, min(data.evaluation, left))


def make_batches(examples: Examples, tokenizer: Any, max_length: int, batch_size: int) -> list[Batch]:
    """Fixed batches on the CPU; text is tokenized with padding to the batch's longest."""
    batches = []
    for start in range(0, len(examples), batch_size):
        part = examples.take(np.arange(start, min(start + batch_size, len(examples))))
        if part.texts is not None:
            if tokenizer is None:
                raise WorkloadError(
                    "model.tokenizer: text data needs a tokenizer and this model has none; "
                    "set model.tokenizer = \"minilm\" or \"hf:DIR\", or give tensor data"
                )
            encoded = tokenizer(part.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch = {k: v for k, v in encoded.items()}
        else:
            batch = dict(part.tensors)
        if part.labels is not None:
            batch["labels"] = part.labels
        batches.append(batch)
    return batches


@DATA_SOURCES.register("stdlib-docs")
def _stdlib_docs(path: Path | None, data) -> Examples:
    return Examples(texts=list(stdlib_sentences()))


@DATA_SOURCES.register("stdlib-paragraphs")
def _stdlib_paragraphs(path: Path | None, data) -> Examples:
    return Examples(texts=list(stdlib_paragraphs()))


BUILT_IN = ("stdlib-docs", "stdlib-paragraphs")  # corpora built offline, no file


@DATA_SOURCES.register("text")
def _text(path: Path, data) -> Examples:
    lines = [line.strip() for line in _read(path).splitlines()]
    return Examples(texts=[line for line in lines if line])


@DATA_SOURCES.register("jsonl")
def _jsonl(path: Path, data) -> Examples:
    texts, labels = [], []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"line {number} of {str(path)!r} is not valid JSON ({e.msg}); one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get(data.text_field), str):
            raise WorkloadError(f"line {number} of {str(path)!r} has no string field {data.text_field!r}; set data.text_field")
        texts.append(record[data.text_field])
        labels.append(record.get(data.label_field))
    has_labels = [label is not None for label in labels]
    if any(has_labels) and not all(has_labels):
        raise WorkloadError(f"{str(path)!r}: some records have {data.label_field!r} and some do not; label all or none")
    if any(has_labels):
        if not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
            raise WorkloadError(f"{str(path)!r}: {data.label_field!r} must be an integer class index")
        return Examples(texts=texts, labels=torch.tensor(labels))
    return Examples(texts=texts)


@DATA_SOURCES.register("tensors")
def _tensors(path: Path, data) -> Examples:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise many types for a bad file
        raise WorkloadError(f"{str(path)!r} is not a readable tensor file ({type(e).__name__}); write it with safetensors or torch.save") from None
    if isinstance(loaded, torch.Tensor):
        loaded = {"inputs": loaded}
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WorkloadError(f"{str(path)!r} must hold a tensor or a dict of tensors")
    sizes = {k: v.shape[0] if v.dim() else 0 for k, v in loaded.items()}
    if len(set(sizes.values())) != 1:
        raise WorkloadError(f"{str(path)!r}: tensors disagree on the number of examples {sizes}; dim 0 indexes examples")
    labels = loaded.pop("labels", None)
    if not loaded:
        raise WorkloadError(f"{str(path)!r} holds only labels; add the inputs")
    return Examples(tensors=loaded, labels=labels)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WorkloadError(f"{str(path)!r} is not UTF-8 text") from None
