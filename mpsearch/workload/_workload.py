"""The Workload: a study's model, data and loss, ready for every later stage."""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from mpsearch.errors import WorkloadError
from mpsearch.plan import width_order
from mpsearch.quant.bank import CandidateBank, default_cache_dir
from mpsearch.quant.budget import Budget
from mpsearch.quant.layers import LayerTable
from mpsearch.spec import Spec
from mpsearch.workload.data import Batch, make_batches, repair_examples, split
from mpsearch.workload.losses import Loss, Outputs, make_loss
from mpsearch.workload.models import LoadedModel, import_callable, load_model, load_tokenizer
from mpsearch.workload.prefix import FpPrefix

Split = Literal["calibration", "evaluation", "test", "repair"]
SPLITS: tuple[str, ...] = ("calibration", "evaluation", "test")  # "repair" (export --repair's own) is drawn on first use

# A logits reference above this many bytes is kept as its top-k (loss.top_k unset).
AUTO_TOP_K_BYTES = 256 << 20
AUTO_TOP_K = 256


@dataclass(frozen=True)
class Evaluation:
    """A model's loss on a split, and its perplexity there when the model is a causal LM.

    ``terms`` are the per-batch sums it was folded from, in batch order: ``(total, count, nll,
    tokens)``. A trial scored in stages (:mod:`mpsearch.search.driver`) gathers its stages' terms
    and folds them with :meth:`of_terms`, the same sum in the same order, so its full-fidelity
    loss is exactly the one-pass loss.
    """

    loss: float
    perplexity: float | None = None
    terms: tuple[tuple[float, float, float, float], ...] = ()

    def metrics(self) -> dict[str, float]:
        return {} if self.perplexity is None else {"perplexity": self.perplexity}

    @classmethod
    def of_terms(cls, terms, which: str = "evaluation") -> "Evaluation":
        """Σ total / Σ count over ``terms``, and the perplexity when they carry next-token counts."""
        total, count, nll, tokens = 0.0, 0.0, 0.0, 0.0
        for t, c, n, k in terms:
            total, count, nll, tokens = total + t, count + c, nll + n, tokens + k
        value = total / count if count else math.nan
        if not math.isfinite(value):
            raise WorkloadError(f"the loss on the {which} set is {value}; check the data and loss.kind")
        return cls(value, math.exp(nll / tokens) if tokens else None, tuple(tuple(t) for t in terms))


class Workload:
    """Everything the rest of mpsearch needs to know about a study's model and data.

    It builds the FP model on ``device``, holds fixed calibration and evaluation
    batches, and computes the loss of any model on them. The FP model's reference
    outputs are computed once per split and reused by every later evaluation.

    >>> from mpsearch.spec import Spec
    >>> w = Workload(Spec.from_toml('[data]\\ncalibration = 4\\nevaluation = 4'), device="cpu")
    >>> len(w.layer_table().layers), w.layer_table().unseen  # the mean-pooled loss never reads the pooler
    (36, ('pooler.dense',))
    >>> w.loss(w.fp_model()) < 1e-6
    True

    Nothing is loaded until it is first needed, and then it is loaded once. A scorer that swaps
    candidates into the model borrows it with :meth:`lend_model` (after every reference output
    is computed); the workload then loads the model again if it needs the FP weights later.
    """

    def __init__(self, spec: Spec, device: str | torch.device | None = None):
        self.spec = spec
        self.device = resolve_device(device if device is not None else spec.search.device)
        self._loaded: LoadedModel | None = None
        self._fp_model: nn.Module | None = None
        self._table: LayerTable | None = None
        self._batches: dict[str, list[Batch]] | None = None
        self._reference: dict[str, list[Outputs]] = {}
        self._draws: dict[str, torch.Generator] = {}
        self._loss: Loss | None = None
        self._banks: dict[tuple, CandidateBank] = {}
        self._model_key: str | None = None
        self._top_k: int | None = spec.loss.top_k
        self._unseen: list[str] | None = None
        self._prefix: FpPrefix | None = None

    # -- the model ---------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None or self._loaded.model is None:
            fresh = load_model(self.spec.model.source, self.spec.base_dir, self.spec.model.dtype)
            if self._loaded is not None:  # the model was lent out: load it again, keep the tokenizer
                fresh.tokenizer = self._loaded.tokenizer
            elif self.spec.model.tokenizer:
                fresh.tokenizer = load_tokenizer(self.spec.model.tokenizer, self.spec.base_dir)
            self._loaded = fresh
        return self._loaded

    def model_key(self) -> str:
        """A hash of the FP model's tensors (computed once): what caches and profiles are valid for."""
        if self._model_key is None:
            from mpsearch.hashing import model_digest

            self._model_key = model_digest(self.loaded.model)
        return self._model_key

    def lend_model(self) -> nn.Module:
        """The FP model itself, on the workload's device, for a caller that will change its weights
        (a scorer swapping candidates in): no copy is made.

        Every split's reference outputs and the model's hash are computed first, while the weights
        are FP; the workload forgets the model, and loads it again if it needs it later.
        """
        for split in SPLITS:
            self.reference(split)
        self.model_key()
        model = self.fp_model()
        self._fp_model = None
        self._loaded.model = None
        return model

    def return_model(self, model: nn.Module) -> None:
        """Take back a lent model whose FP weights are all in place again (no reload needed)."""
        if self._loaded is not None and self._loaded.model is None:
            self._fp_model = model
            self._loaded.model = model

    @property
    def is_causal_lm(self) -> bool:
        """Whether the model predicts the next token (so its perplexity on the data means something)."""
        model = self.loaded.model
        config = getattr(model, "config", None)
        return bool(getattr(config, "is_decoder", False)) or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))

    def build_model(self, device: str | torch.device | None = None) -> nn.Module:
        """A fresh FP copy of the model on ``device`` (the workload's by default), in eval mode."""
        return copy.deepcopy(self.loaded.model).to(device or self.device).eval()

    def fp_model(self) -> nn.Module:
        """The workload's own FP model on its device: read it, never modify it."""
        if self._fp_model is None:
            self._fp_model = self.loaded.model if self.device.type == "cpu" else self.build_model()
        return self._fp_model

    def layer_table(self) -> LayerTable:
        """The quantizable layers. Those the loss cannot see are found first and, as
        ``layers.unseen`` says, left out of the plan or kept in it; the table names them."""
        if self._table is None:
            s = self.spec
            table = partial(
                LayerTable.from_model, self.loaded.model, s.scheme, menu=s.quant.menu(),
                include=s.layers.include, exclude=s.layers.exclude, embeddings=s.layers.embeddings, target=s.target.format,
            )
            unseen = self.unseen_layers(table().names)
            self._table = table(unseen=unseen, leave_unseen=s.layers.unseen == "exclude", pin_unseen=s.layers.unseen == "fp16")
        return self._table

    def unseen_layers(self, names: list[str]) -> list[str]:
        """The layers among ``names`` the loss cannot see (:mod:`mpsearch.workload.reach`):
        one forward and backward pass, once; a worker takes them from the driver's snapshot."""
        if self._unseen is None:
            from mpsearch.workload.reach import unseen_layers

            self._unseen = unseen_layers(self, names)
        return [name for name in names if name in self._unseen]

    def candidate_bank(
        self,
        bits: Sequence[int] | None = None,
        *,
        progress: bool = False,
        cache_dir: str | Path | None | Literal["default"] = "default",
    ) -> CandidateBank:
        """The bank of every (layer, bits) candidate (``bits``: the menu by default), built once.

        It is built on the workload's device from the FP model, with the calibration
        batches for methods that need them, and cached on disk (``cache_dir``, by default
        ``$MPSEARCH_CACHE_DIR`` or ``~/.cache/mpsearch/banks``; ``None`` for no cache).
        """
        wanted = tuple(sorted(set(bits if bits is not None else self.layer_table().menu), key=width_order))
        bank = self._banks.get(wanted)
        if bank is None:
            folder = default_cache_dir() if cache_dir == "default" else cache_dir
            bank = CandidateBank.build(
                self.fp_model(),
                self.layer_table(),
                bits=wanted,
                batches=self.calibration_batches(),
                forward=self.forward,
                cache_dir=folder,
                model_key=self.model_key(),
                progress=progress,
                source_dir=self.source_dir() if self.spec.target.format == "gguf" else None,
                imatrix=self.imatrix_text() if self.spec.target.imatrix else None,
            )
            self._banks[wanted] = bank
        return bank

    def imatrix_text(self) -> tuple[str, int]:
        """The calibration split as one text for llama-imatrix, and its context length (target.imatrix)."""
        from mpsearch.workload.data import split

        if not self.is_causal_lm:
            raise WorkloadError("target.imatrix needs a causal LM (llama-imatrix runs the model as a language model); drop it for this model")
        texts = split(self.spec.data, self.spec.resolve)[0].texts
        if texts is None:
            raise WorkloadError("target.imatrix needs text calibration data (llama-imatrix tokenizes it itself); use a .txt or .jsonl data.source")
        return "\n\n".join(texts), min(self.spec.data.max_length, 512)

    def source_dir(self) -> Path:
        """The model's Hugging Face folder (the gguf target converts it with llama.cpp)."""
        from mpsearch.workload.models import hf_folder

        folder = hf_folder(self.spec.model.source, self.spec.base_dir)
        if folder is None:
            raise WorkloadError(
                f"target.format = \"gguf\" needs a model llama.cpp's converter can read; {self.spec.model.source.split(':')[0]}: "
                "models are not saved folders. Use model.source = \"hf:DIR\" (a saved Hugging Face folder), minilm or smollm2"
            )
        return folder

    def budget_bytes(self, budget: Budget | None = None) -> int:
        """The byte limit of ``budget`` (the spec's by default), checked against this model."""
        return self.layer_table().budget_bytes(budget or self.spec.budget.to_budget())

    # -- data --------------------------------------------------------------------------

    def batches(self, which: Split) -> list[Batch]:
        """The split's fixed batches. ``repair`` is ``export.repair_examples`` examples: the
        calibration split and the next examples of its seeded draw (see
        :func:`~mpsearch.workload.data.repair_examples`); unset, the calibration split's batches."""
        data = self.spec.data
        if self._batches is None:
            self._batches = {name: self._tokenized(ex) for name, ex in zip(SPLITS, split(data, self.spec.resolve))}
        if which == "repair" and which not in self._batches:
            count = self.spec.export.repair_examples
            self._batches[which] = self._batches["calibration"] if count is None else self._tokenized(repair_examples(data, self.spec.resolve, count))
        return self._batches[which]

    def _tokenized(self, examples) -> list[Batch]:
        data = self.spec.data
        return [{k: v.to(self.device) for k, v in b.items()} for b in make_batches(examples, self.loaded.tokenizer, data.max_length, data.batch_size)]

    def snapshot(self) -> dict:
        """The tokenized batches and FP reference outputs of both splits, on the CPU.

        A worker that :meth:`adopt` s it skips reading the data, tokenizing it and running
        the FP model: only the model itself is loaded again.
        """
        cpu = lambda batch: {k: v.cpu() for k, v in batch.items()}  # noqa: E731
        return {
            "batches": {split: [cpu(b) for b in self.batches(split)] for split in SPLITS},
            "reference": {split: [None if r is None else r.map(lambda t: t.cpu()) for r in self.reference(split)] for split in SPLITS},
            "model_key": self.model_key(),
            "unseen": list(self.layer_table().unseen),
        }

    def adopt(self, snapshot: dict) -> "Workload":
        """Take batches and reference outputs from another workload's :meth:`snapshot` of the same spec."""
        self._batches = {split: [{k: v.to(self.device) for k, v in b.items()} for b in bs] for split, bs in snapshot["batches"].items()}
        self._reference = {
            split: [None if r is None else r.map(lambda t: t.to(self.device)) for r in refs]
            for split, refs in snapshot["reference"].items()
            if any(r is not None for r in refs)
        }
        self._model_key = snapshot.get("model_key", self._model_key)
        if "unseen" in snapshot:
            self._unseen = list(snapshot["unseen"])
        return self

    def calibration_batches(self) -> list[Batch]:
        return self.batches("calibration")

    def evaluation_batches(self) -> list[Batch]:
        return self.batches("evaluation")

    # -- the loss ----------------------------------------------------------------------

    @property
    def loss_fn(self) -> Loss:
        if self._loss is None:
            user = None
            if self.spec.loss.kind == "callable":
                module, _, fn = self.spec.loss.callable.rpartition(":")
                user = import_callable(module, fn, self.spec.base_dir, field="loss.callable")
            self._loss = make_loss(self.spec.loss.kind, user)
        return self._loss

    def fp_prefix(self) -> FpPrefix:
        """The kept FP block outputs that :meth:`evaluate` starts partial plans from."""
        if self._prefix is None:
            from mpsearch.quant.blockwise import blocks_of

            self._prefix = FpPrefix(lambda model: blocks_of(model, self.layer_table()))
        return self._prefix

    def forward(self, model: nn.Module, batch: Batch) -> Outputs:
        return Outputs.of(model(**_accepted_inputs(model, batch)))

    def forward_hidden(self, model: nn.Module, batch: Batch) -> tuple[Outputs, tuple[torch.Tensor, ...] | None]:
        """The outputs, and each block's output (transformers' ``hidden_states`` after the
        embeddings), or None for a model that does not give them."""
        inputs = _accepted_inputs(model, batch)
        if not hasattr(getattr(model, "config", None), "output_hidden_states"):
            return self.forward(model, batch), None
        raw = model(**inputs, output_hidden_states=True)
        hidden = getattr(raw, "hidden_states", None)
        return Outputs.of(raw), (tuple(hidden[1:]) if hidden is not None and len(hidden) > 1 else None)

    def reference(self, which: Split, stop: int | None = None) -> list[Outputs] | list[None]:
        """The FP model's outputs on each batch of ``which`` (or on its first ``stop`` batches),
        computed on first use and only as far as asked: a caller that reads one batch (the reach
        test of :meth:`layer_table`) does not run the FP model over the whole split. Computed in
        pieces or at once, the outputs are the same.

        Logits are kept as their top ``loss.top_k`` (see :class:`~mpsearch.workload.losses.TopK`)
        where the loss reads them that way; unset, only when all of them would take more than
        256 MiB, which a causal LM's examples × tokens × vocabulary floats soon do.
        """
        if which == "repair" and self.spec.export.repair_examples is None:
            which = "calibration"  # the same batches: one copy of their outputs
        batches = self.batches(which)
        stop = len(batches) if stop is None else min(stop, len(batches))
        if not self.loss_fn.needs_reference:
            return [None] * stop
        refs = self._reference.setdefault(which, [])
        if len(refs) < stop:
            model = self.fp_model()
            if which not in self._draws:  # the tail draws: fixed by the seed, drawn batch after batch
                self._draws[which] = torch.Generator(device=self.device).manual_seed(self.spec.search.seed)
            draws = self._draws[which]
            # On the CPU the reference is computed on one thread: with more, the logits differ in
            # their last bits and the tail draws with them, so a scorer in a 1-thread Ray actor and
            # an export on 2 threads scored the same plan 2e-4 apart (measured on SmolLM2).
            threads = torch.get_num_threads()
            if self.device.type == "cpu":
                torch.set_num_threads(1)
            try:
                with torch.no_grad():
                    for batch in batches[len(refs):stop]:
                        out = self.forward(model, batch)
                        refs.append(out.kept(self._reference_top_k(out, len(batches)), draws) if self.loss_fn.reads_top_k else out)
            finally:
                torch.set_num_threads(threads)
        return refs if stop == len(refs) else refs[:stop]

    def _reference_top_k(self, out: Outputs, n_batches: int) -> int:
        if self._top_k is None:  # decided once, from the first batch's size
            full = out.value.numel() * 4 * n_batches if out.kind == "logits" else 0
            self._top_k = AUTO_TOP_K if full > AUTO_TOP_K_BYTES else 0
        return self._top_k

    def loss_terms(self, model: nn.Module, which: Split, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, count)`` of batch ``index``, with autograd left on for the caller."""
        batch = self.batches(which)[index]
        return self.loss_fn(self.forward(model, batch), self.reference(which, index + 1)[index], batch)

    def loss(self, model: nn.Module, which: Split = "evaluation") -> float:
        """The loss of ``model`` over a whole split: Σ total / Σ count."""
        return self.evaluate(model, which, perplexity=False).loss

    def evaluate(
        self, model: nn.Module, which: Split = "evaluation", perplexity: bool = True, start: int = 0, stop: int | None = None,
        quantized: Sequence[str] | None = None,
    ) -> Evaluation:
        """The loss of ``model`` over a whole split (or its batches ``start:stop``, one stage of a
        trial) and, for a causal LM, its perplexity on the split's own next tokens (from the
        same forward passes).

        ``quantized``: the only layers of ``model`` that are not FP (a partial plan, as a
        perturbation scan scores). The blocks before the first of them are then not run again
        where their FP outputs are kept (:mod:`mpsearch.workload.prefix`); the loss is the same
        to the bit.
        """
        from mpsearch.workload.losses import causal_lm_terms

        lm = perplexity and self.is_causal_lm
        terms = []
        refs = self.reference(which)
        batches = self.batches(which)
        prefix = self.fp_prefix() if quantized is not None else None
        fp_blocks = prefix.fp_blocks(model, quantized) if prefix is not None else 0
        if prefix is None and self._prefix is not None:
            self._prefix.forget()  # a whole plan: the kept outputs' scan is over
        with torch.no_grad():
            for index, (batch, ref) in list(enumerate(zip(batches, refs)))[start:stop]:
                if fp_blocks:
                    same = lambda a, b, ref=ref, batch=batch: [float(x) for x in self.loss_fn(a, ref, batch)] == [float(x) for x in self.loss_fn(b, ref, batch)]
                    out = prefix.forward(model, which, index, len(batches), fp_blocks, lambda batch=batch: self.forward(model, batch), same)
                else:
                    out = self.forward(model, batch)
                t, c = self.loss_fn(out, ref, batch)
                n, k = causal_lm_terms(out, None, batch) if lm else (0.0, 0.0)
                terms.append((float(t), float(c), float(n), float(k)))
        return Evaluation.of_terms(terms, which)


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is CUDA when this torch sees a GPU, else the CPU; a device that is not there is
    refused in one line.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise WorkloadError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise WorkloadError(f"device {name!r} is not available ({why}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise WorkloadError(f"device {name!r} is not available: {torch.cuda.device_count()} GPU(s) visible; use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif device.type not in ("cpu", "mps"):
        raise WorkloadError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _accepted_inputs(model: nn.Module, batch: Batch) -> dict:
    """The batch's inputs that ``model.forward`` takes; labels are the loss's, not the model's.
    A model that would keep a generation cache (``use_cache``) is told not to: only the outputs count."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    params = inspect.signature(model.forward).parameters
    named = {k: v for k, v in inputs.items() if k in params}
    if named:
        if "use_cache" in params:
            named["use_cache"] = False
        return _token_ids_checked(named)
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(inputs) == 1 and positional:
        # A plain module with forward(x): hand it the one tensor under its own argument name.
        return _token_ids_checked({positional[0].name: next(iter(inputs.values()))})
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return _token_ids_checked(inputs)
    raise WorkloadError(
        f"the model's forward() takes {list(params)} but the data gives {list(inputs)}; name the tensors after its arguments"
    )


def _token_ids_checked(inputs: dict) -> dict:
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and (ids.is_floating_point() or ids.is_complex()):
        raise WorkloadError(
            f"data: the model takes token ids (input_ids) but the data gives {str(ids.dtype).removeprefix('torch.')} tensors; "
            "give integer token ids, or text for its tokenizer"
        )
    return inputs
