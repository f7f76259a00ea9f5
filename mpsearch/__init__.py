"""mpsearch: sensitivity-driven mixed-precision quantization search.

The few things a user imports live here; everything else sits in its own folder, lowest
layer first: ``storage`` (the database and the trial log) and ``quant`` (the quantization core),
``spec``, ``workload`` (model, data, loss), ``runtime`` (Ray scorers), ``sensitivity``,
``search``, ``export`` (packed models and their loader), ``service`` (HTTP API, cluster jobs)
and ``cli``.

The names below are imported on first use, so that importing a part of mpsearch (the CLI's
``--help``, say) does not load torch.

>>> import mpsearch
>>> mpsearch.Plan.of_bits({"fc": 4}).bits()
{'fc': 4}
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mpsearch")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

_PUBLIC = {
    "BIT_MENU": "mpsearch.plan",
    "Budget": "mpsearch.quant",
    "LayerChoice": "mpsearch.plan",
    "LayerTable": "mpsearch.quant",
    "load_quantized": "mpsearch.export",
    "MPSearchError": "mpsearch.errors",
    "Plan": "mpsearch.plan",
    "Scheme": "mpsearch.quant",
    "Spec": "mpsearch.spec",
    "SpecError": "mpsearch.errors",
    "Workload": "mpsearch.workload",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
