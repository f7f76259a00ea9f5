"""The study spec: one TOML file that says what to quantize, on what data, and under what budget.

Every field is validated on load, and an error names the field by its path
(``budget.bpw: must be > 0``). Relative paths in a spec are relative to the spec file.

A minimal spec (every section has defaults; see ``studies/minilm.toml`` for all of them):

>>> spec = Spec.from_toml('budget = "4.0bpw"\\n[model]\\nsource = "minilm"\\n')
>>> spec.budget.to_budget()
Budget(unit='bpw', value=4.0)
>>> Spec.from_toml('[quant]\\nbits = [2, 7]\\n')
Traceback (most recent call last):
...
mpsearch.errors.SpecError: quant.bits: 7 is not a supported bit-width; choose from 2, 3, 4, 8, 16 (and 5, 6 with target.format = "gguf")
>>> Spec.from_toml('[target]\\nformat = "gguf"\\n').quant.bits  # llama.cpp's levels, Q2_K to Q6_K, Q8_0, F16
(2, 3, 4, 5, 6, 8, 16)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from mpsearch.errors import MPSearchError, SpecError
from mpsearch.hashing import json_digest
from mpsearch.quant.apply import QUANTIZERS
from mpsearch.quant.budget import Budget
from mpsearch.plan import FLOAT_BITS, PLAN_BITS, parse_width
from mpsearch.quant.scheme import BIT_MENU, Scheme

FORMAT_VERSION = 1
VLLM_BITS = (4, 8, 16)  # `quant.bits = "vllm"`: what vLLM runs of a compressed-tensors export (WNA16 at 4 and 8 bits)
MAX_TRIALS = 1_000_000  # a bound on search.trials and --trials: larger is a typo, not a study
DEFAULT_STORAGE = "sqlite:///mpsearch.db"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Section):
    source: str = Field("minilm", description="`minilm`, `hf:DIR` or `python:module:function`")
    tokenizer: str | None = Field(None, description="a model source whose tokenizer to use (for `python:` models on text)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class DataSection(_Section):
    source: str = Field("stdlib-docs", description="`stdlib-docs` (sentences), `stdlib-paragraphs`, or a .txt, .jsonl, .safetensors or .pt file")
    format: Literal["auto", "text", "jsonl", "tensors", "stdlib-docs", "stdlib-paragraphs"] = "auto"
    eval_source: str | None = Field(None, description="a separate file for evaluation; default: split `source`")
    text_field: str = "text"
    label_field: str = "label"
    calibration: PositiveInt = 128
    evaluation: PositiveInt = 128
    test: PositiveInt | None = Field(None, description="held-out examples the final plans are scored on once (never searched on); default: as many as evaluation, where the source has them")
    max_length: PositiveInt = 128
    batch_size: PositiveInt = 16
    seed: int = 0


class LossSection(_Section):
    kind: str = Field("distill", description="distill, kl, cosine, mse, causal-lm, error-rate or callable")
    callable: str | None = Field(None, description="`module:function` for kind = \"callable\"")
    top_k: NonNegativeInt | None = Field(
        None,
        description="a logits reference keeps each position's top_k likeliest tokens, the rest's mass and top_k draws from the rest; 0: every logit; "
        "default: every logit unless they would take over 256 MiB, then 256",
    )

    @model_validator(mode="after")
    def _callable_given(self):
        if self.kind == "callable" and not self.callable:
            raise ValueError('kind = "callable" needs loss.callable = "module:function"')
        if self.callable is not None:
            module, _, fn = self.callable.rpartition(":")
            if not module or not fn:
                raise ValueError(f'callable must be "module:function", got {self.callable!r}')
        return self


class QuantSection(_Section):
    bits: tuple[int, ...] = BIT_MENU
    options: tuple[str, ...] = Field(
        (), description='scheme options added to the menu beside quant.bits: BITS[gGROUP][a|s], e.g. "2g32" (2 bits in groups of 32), '
        '"3g64a" (3 bits, groups of 64, asymmetric); each is a candidate of its own, at its exact bytes',
    )
    group_size: int = 128
    symmetric: bool = True
    method: str = Field("rtn", description="a quantization method: rtn or gptq")
    scale_dtype: Literal["float16", "bfloat16"] = "float16"
    ragged: Literal["pad", "per-channel"] = "pad"
    damp: float = Field(0.1, gt=0, lt=1, description="gptq: damping, a fraction of the mean diagonal of XᵀX")
    act_order: bool = Field(True, description="gptq: quantize columns in decreasing input energy")
    clip: Literal["none", "mse", "weighted"] = Field(
        "none", description="how each group's range is set: none covers every weight; mse shrinks it (down to half) where that "
        "lowers the group's squared error, for rtn and gptq alike; weighted (gptq) weighs each input column's error by its "
        "mean squared activation on the calibration split",
    )

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, value: Any):
        if value == "vllm":  # the widths vLLM's WNA16 kernels run (compressed-tensors exports)
            return VLLM_BITS
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"expected a non-empty list of bit-widths from {', '.join(map(str, BIT_MENU))}, or \"vllm\" (4, 8, 16)")
        for b in value:
            if isinstance(b, bool) or not isinstance(b, int) or b not in PLAN_BITS:
                raise ValueError(f"{b!r} is not a supported bit-width; choose from {', '.join(map(str, BIT_MENU))} (and 5, 6 with target.format = \"gguf\")")
        if len(set(value)) != len(value):
            raise ValueError("lists a bit-width twice")
        return tuple(sorted(value))

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, value: Any):
        if not isinstance(value, (list, tuple)):
            raise ValueError('expected a list of scheme options such as ["2g32", "3g64a"]')
        for label in value:
            if not isinstance(label, str):
                raise ValueError(f'{label!r} is not a scheme option; write BITS[gGROUP][a|s] as a string, e.g. "2g32"')
            try:
                bits = parse_width(label)[0]
            except MPSearchError as e:
                raise ValueError(str(e)) from None
            if bits not in BIT_MENU or bits == FLOAT_BITS:
                raise ValueError(f"{label!r}: an option's bits are 2, 3, 4 or 8 (mpsearch's integer codes)")
        if len(set(value)) != len(value):
            raise ValueError("lists an option twice")
        return tuple(value)

    @model_validator(mode="after")
    def _distinct_options(self):
        for label in self.options:
            _bits, group, sym = parse_width(label)
            if group in (None, self.group_size) and sym in (None, self.symmetric):
                raise ValueError(
                    f"option {label!r} is plain {_bits} bits under this scheme (group_size {self.group_size}, "
                    f"{'symmetric' if self.symmetric else 'asymmetric'}); drop it, or give it another group size or symmetry"
                )
        return self

    def menu(self) -> tuple:
        """The search's menu: ``bits`` and the scheme ``options``."""
        return (*self.bits, *self.options)

    @field_validator("method")
    @classmethod
    def _method(cls, value: str):
        if value not in QUANTIZERS:
            raise ValueError(f"must be one of the quantization methods {', '.join(QUANTIZERS.names())}, got {value!r}")
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int):
        if value != -1 and value < 1:
            raise ValueError(f"must be -1 (one scale per output channel) or a positive integer, got {value}")
        return value

    def to_scheme(self) -> Scheme:
        return Scheme(
            group_size=self.group_size,
            symmetric=self.symmetric,
            method=self.method,
            scale_dtype=self.scale_dtype,
            ragged=self.ragged,
            damp=self.damp,
            act_order=self.act_order,
            clip=self.clip,
        )


class LayersSection(_Section):
    include: list[str] = ["*"]
    exclude: list[str] = []
    embeddings: bool = False
    # A layer whose output no term of the loss reads (mpsearch.workload.reach): "exclude" leaves
    # it out of the plan at the model's own dtype, as `exclude` would; "search" keeps it in, where
    # it costs nothing at the smallest width (and the output it feeds degrades); "fp16" keeps it in
    # the plan at 16 bits whatever the search does (its bytes count against the budget).
    unseen: Literal["exclude", "search", "fp16"] = "exclude"


class BudgetSection(_Section):
    bytes: PositiveInt | None = None
    mib: float | None = Field(None, gt=0, allow_inf_nan=False)
    bpw: float | None = Field(None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("bytes", "mib", "bpw") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bytes, mib or bpw (got {', '.join(given) or 'none'})")
        return self

    def to_budget(self) -> Budget:
        unit = next(k for k in ("bytes", "mib", "bpw") if getattr(self, k) is not None)
        return Budget(unit, float(getattr(self, unit)))


class SearchSection(_Section):
    sampler: str = Field("tpe-evo", description="a sampler of mpsearch.search.sampler.SAMPLERS: tpe, nsga2, random, evo, tpe-evo (TPE, then level switches once it stalls), evo-screened or tpe-evo-screened (level switches screened by a model fitted to the trials)")
    screen: int = Field(
        64, ge=2, le=4096,
        description="evo-screened and tpe-evo-screened: each level-switch child is the one of this many new children that the model fitted to the trials predicts lowest",
    )
    patience: PositiveInt = Field(
        32,
        description="tpe-evo and tpe-evo-screened: TPE hands over to level switches once this many sampled trials in a row have found no better plan",
    )
    trials: int = Field(64, ge=1, le=MAX_TRIALS, description=f"trials a study runs in all (at most {MAX_TRIALS:,})")
    workers: NonNegativeInt = 2  # 0: score in the driver's own process, no Ray
    seed: int = 0
    fill: bool = True  # every evaluated plan is maximal: no layer could go up a step and still fit
    synchronous: bool = True  # rounds of one trial per worker, told in order: reproducible
    trial_timeout_s: PositiveFloat = 600.0
    time_limit_s: PositiveFloat | None = Field(
        None,
        description="wall-clock seconds for the trials (the bank and the profiles before them not counted): no trial starts after it, "
        "those running finish; trials stays the most. None: no limit",
    )
    device: str = Field("auto", description="where the workload runs: auto (cuda when available), cpu, cuda or cuda:N")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each Ray worker reserves (fractions share a GPU); > 0 puts the workers on cuda")
    trial_writes: Literal["batched", "optuna"] = Field("batched", description="batched: a trial's plan in one transaction; optuna: Optuna's own ask/tell")
    flagged_warm_starts: bool = Field(False, description="warm-start from a sensitivity profile that flags layers (negative or unsettled traces)")
    relinearise_every: NonNegativeInt = Field(0, description="every K trials, the ILP re-solved on the loss changes of single-layer switches around the best plan, its plan run next; 0: never")
    pruner: str = Field("none", description="a pruner of mpsearch.search.pruner.PRUNERS: none, race, forecast, halving or percentile")
    stages: list[float] = Field([0.25, 1.0], description="with a pruner: the fractions of the evaluation set a trial is scored on before each check")
    profiles: list[str] = Field(
        ["hessian", "perturbation"],
        description="the sensitivity profiles measured (or read from the database) before the first trial, each an ILP warm start "
        "(perturbation also the greedy one); proposals are repaired by the perturbation Δloss, else by the first listed. perturbation "
        "scores each layer alone at each menu entry (layers × menu calibration passes): leave it out for an LLM on a CPU",
    )

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, value: list[str]):
        if not value or len(set(value)) != len(value):
            raise ValueError(f"profiles must name one sensitivity method at least, each once (e.g. [\"hessian\"]), got {value}")
        return value

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[float]):
        if not value or any(not 0 < f <= 1 for f in value) or any(b <= a for a, b in zip(value, value[1:])) or value[-1] != 1:
            raise ValueError(f"stages must rise from above 0 to exactly 1.0 (e.g. [0.25, 1.0]), got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
        return value


# Fields added since mpsearch 0.1.0, keyed only when they differ from the value that behaves as
# that version did (a study made then keeps its digest, and resumes).
_LATER_FIELDS = (("loss", "top_k", None), ("data", "test", None), ("layers", "unseen", "search"), ("quant", "options", []), ("quant", "clip", "none"))


class SensitivitySection(_Section):
    """How the search (and `mpsearch analyze` by default) measures the Hessian profile."""

    max_probes: int = Field(48, ge=2, description="hessian: most Hutchinson probes per layer; the estimate stops earlier once every layer's trace settles (after 8 at least)")
    tol: PositiveFloat = Field(0.05, description="hessian: the stopping rule's relative tolerance (a layer's running mean moved by at most tol on the last probe, and its standard error within tol of it)")


class ExportSection(_Section):
    refine: Literal["none", "sequential", "blockwise"] = Field(
        "none",
        description="sequential: re-quantize the chosen plan with GPTQ in forward order at export; blockwise: that, then learn each "
        "block's rounding (a code moves at most one level) and scales against the FP model's block outputs on the repair_examples "
        "examples; either is kept only if the evaluation loss drops",
    )
    blockwise_steps: PositiveInt = Field(
        200, description="refine blockwise: Adam steps a block, one batch a step, at 1e-2 for the rounding and 1e-3 for the scales, decaying linearly to 0",
    )
    repair_hidden: float = Field(
        10.0, ge=0,
        description="export --repair: the weight of its hidden-state term (each block's output against the FP model's, relative squared "
        "error, averaged over blocks) beside the study's loss; 0 tunes on the study's loss alone",
    )
    repair_examples: PositiveInt | None = Field(
        None,
        description="export --repair and refine blockwise: how many examples they tune on: the calibration split and the next examples of the same "
        "seeded draw (never an evaluation or test example); unset: the calibration split alone",
    )
    repair_lr: PositiveFloat = Field(
        1e-3, description="export --repair: Adam's learning rate on the scale gains (the norms and biases take a tenth of it)",
    )
    repair_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="export --repair: the learning rate over the steps: constant, or cosine (from repair_lr down to 0 over the steps)",
    )


class TargetSection(_Section):
    format: Literal["mpsearch", "gguf", "compressed-tensors"] = Field(
        "mpsearch",
        description="whose types the candidates are: mpsearch's own packing, or llama.cpp's (gguf: quantized by llama-quantize, "
        "bytes of the GGUF, exported as one .gguf); default quant.bits for gguf: 2, 3, 4, 5, 6, 8, 16. compressed-tensors: "
        "mpsearch's codes at the bytes of compressed-tensors' layout, exported as a Hugging Face folder that transformers loads",
    )
    imatrix: bool = Field(
        False,
        description="gguf, causal LMs: llama-imatrix measures the importance of each input column on the calibration split, and "
        "llama-quantize weighs its rounding by it, for the candidates and the export alike",
    )


class StorageSection(_Section):
    url: str = DEFAULT_STORAGE


class Spec(_Section):
    """A validated study spec. Build it with :meth:`load` (a file) or :meth:`from_toml`."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str | None = None
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    quant: QuantSection = QuantSection()
    layers: LayersSection = LayersSection()
    budget: BudgetSection = BudgetSection(bpw=4.0)
    search: SearchSection = SearchSection()
    sensitivity: SensitivitySection = SensitivitySection()
    export: ExportSection = ExportSection()
    target: TargetSection = TargetSection()
    storage: StorageSection = StorageSection()
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_string(cls, value: Any):
        # `budget = "4.0bpw"` / `budget = "5.2MiB"` / `budget = 5000000` as well as a table.
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            b = Budget.parse(value)
            return {"bytes": int(b.value) if b.unit == "bytes" else None, "mib": b.value if b.unit == "mib" else None,
                    "bpw": b.value if b.unit == "bpw" else None}
        return value

    @model_validator(mode="before")
    @classmethod
    def _target_menu(cls, raw: Any):
        # The gguf target's default menu is llama.cpp's levels, 5 and 6 included.
        if isinstance(raw, dict) and isinstance(raw.get("target"), dict) and raw["target"].get("format") == "gguf":
            quant = raw.get("quant")
            if quant is None or (isinstance(quant, dict) and "bits" not in quant):
                from mpsearch.quant.gguf import GGUF_LEVELS

                raw = {**raw, "quant": {**(quant or {}), "bits": list(GGUF_LEVELS)}}
        return raw

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        path = Path(path)
        if not path.is_file():
            problem = "is a folder" if path.is_dir() else "does not exist"
            raise MPSearchError(f"spec {str(path)!r} {problem}; pass a study TOML such as studies/minilm.toml")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MPSearchError(f"spec {str(path)!r} cannot be read ({e}); pass a UTF-8 TOML file") from e
        spec = cls.from_toml(text, base_dir=path.resolve().parent, origin=str(path))
        if spec.name is None:
            spec = spec.model_copy(update={"name": path.stem})
        return spec

    @classmethod
    def from_toml(cls, text: str, base_dir: Path | None = None, origin: str = "spec") -> "Spec":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise MPSearchError(f"{origin} is not valid TOML: {e}; fix the syntax at that line") from e
        except RecursionError:
            raise MPSearchError(f"{origin} nests arrays or tables too deeply to read; a study spec is a few flat tables") from None
        return cls.from_dict(raw, base_dir=base_dir)

    @classmethod
    def from_dict(cls, raw: dict, base_dir: Path | None = None) -> "Spec":
        try:
            spec = cls.model_validate({**raw, "base_dir": base_dir or Path.cwd()})
        except ValidationError as e:
            raise _spec_error(e) from None
        except MPSearchError as e:  # raised by Budget.parse inside a validator
            raise SpecError("", str(e)) from None
        except RecursionError:
            raise MPSearchError("the spec nests arrays or tables too deeply to read; a study spec is a few flat tables") from None
        spec._check_paths()
        spec._check_target()
        return spec

    def with_overrides(self, **sections: dict) -> "Spec":
        """A copy with some fields replaced, validated like the file (e.g. ``budget="3.5bpw"``)."""
        raw = self.model_dump(exclude={"base_dir"})
        for key, value in sections.items():
            raw[key] = value
        return Spec.from_dict(raw, base_dir=self.base_dir)

    # -- paths -------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def _check_paths(self) -> None:
        for field, source in (("model.source", self.model.source), ("model.tokenizer", self.model.tokenizer)):
            if source and source.startswith("hf:"):
                p = self.resolve(source[3:])
                if not p.is_dir():
                    raise SpecError(field, f"model directory {str(p)!r} does not exist; point hf: at a saved Hugging Face model directory")
        for field, source in (("data.source", self.data.source), ("data.eval_source", self.data.eval_source)):
            if source is None or source in ("stdlib-docs", "stdlib-paragraphs"):
                continue
            p = self.resolve(source)
            if not p.is_file():
                raise SpecError(field, f"data file {str(p)!r} does not exist; give a .txt, .jsonl, .safetensors or .pt file, or stdlib-docs")
            if p.stat().st_size == 0:
                raise SpecError(field, f"data file {str(p)!r} is empty; it needs at least one example")

    def _check_target(self) -> None:
        odd = [b for b in self.quant.bits if b not in BIT_MENU]
        if odd and self.target.format != "gguf":
            raise SpecError("quant.bits", f"{odd[0]} bits are llama.cpp's Q{odd[0]} types: set target.format = \"gguf\", or choose from {', '.join(map(str, BIT_MENU))}")
        if self.layers.unseen == "fp16" and FLOAT_BITS not in self.quant.bits:
            raise SpecError("layers.unseen", "\"fp16\" keeps the layers the loss cannot see at 16 bits: add 16 to quant.bits, or choose \"exclude\"")
        if self.quant.options and self.target.format == "gguf":
            raise SpecError("quant.options", "the gguf target's candidates are llama.cpp's types, one a level: drop quant.options, or use another target")
        if self.quant.clip != "none" and self.target.format == "gguf":
            raise SpecError("quant.clip", "the gguf target's candidates are llama.cpp's types, which fit their own scales: drop quant.clip, or use another target")
        if self.quant.clip == "weighted" and self.quant.method != "gptq":
            raise SpecError("quant.clip", f"\"weighted\" weighs the error by the calibration inputs, which {self.quant.method!r} does not gather: use quant.method = \"gptq\", or clip = \"mse\"")
        if self.target.imatrix and self.target.format != "gguf":
            raise SpecError("target.imatrix", "an importance matrix weighs llama.cpp's quantizers: set target.format = \"gguf\", or drop it")

    @property
    def scheme(self) -> Scheme:
        return self.quant.to_scheme()

    def digest(self) -> str:
        """A hash of what a study's losses depend on: the model, data, loss, scheme and layers.

        Fields added since mpsearch 0.1.0 count only when set, so a study made then has the same
        digest now and can be resumed.
        """
        return json_digest(self.keyed())

    def keyed(self) -> dict:
        """The sections a study's losses depend on, as the digest and stored profiles key them."""
        dumped = self.model_dump(mode="json")
        keyed = {k: dumped[k] for k in ("model", "data", "loss", "quant", "layers")}
        for section, field, as_before in _LATER_FIELDS:
            if keyed[section].get(field) == as_before:
                keyed[section].pop(field, None)
        if self.target.format != "mpsearch":  # a later section: it counts only when set
            keyed["target"] = dumped["target"]
            if not self.target.imatrix:  # a later field too
                keyed["target"].pop("imatrix")
        return keyed



def _spec_error(e: ValidationError) -> SpecError:
    """The first validation error as ``path: problem``, with a count of the rest."""
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(part) for part in first["loc"])
    kind, ctx, value = first["type"], first.get("ctx") or {}, first.get("input")
    if kind == "extra_forbidden":
        section_fields = _known_fields(first["loc"][:-1])
        problem = f"unknown field; known fields here: {', '.join(section_fields)}"
    elif kind == "missing":
        problem = "is required"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        problem = f"must be {op} {next(iter(ctx.values()))}, got {value!r}"
    elif kind == "literal_error":
        problem = f"must be one of {ctx.get('expected')}, got {value!r}"
    elif kind == "value_error":
        problem = str(ctx.get("error", first["msg"]))
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        expected = _TYPE_WORDS.get(kind.rsplit("_", 1)[0], kind.rsplit("_", 1)[0])
        problem = f"expected {expected}, got {type(value).__name__} {value!r}"
    else:
        problem = first["msg"][0].lower() + first["msg"][1:]
    if len(errors) > 1:
        problem += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return SpecError(loc, problem)


_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "string": "a string", "bool": "true or false",
    "list": "a list", "tuple": "a list", "model": "a table", "dict": "a table", "model_attributes": "a table",
}


def _known_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = Spec
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return [name for name in model.model_fields if name != "base_dir"]
