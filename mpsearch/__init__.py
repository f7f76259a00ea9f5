"""mpsearch: sensitivity-driven mixed-precision quantization search.

The few things a user imports live here; everything else sits in its own folder:
``quant`` (the quantization core), ``workload`` (model, data, loss), ``sensitivity``,
``search``, ``storage``, ``export`` (packed models and their loader), ``service`` (CLI).
"""

from importlib.metadata import PackageNotFoundError, version

from mpsearch.errors import MPSearchError, SpecError
from mpsearch.export import load_quantized
from mpsearch.quant import BIT_MENU, Budget, LayerTable, Scheme
from mpsearch.spec import Spec
from mpsearch.workload import Workload

try:
    __version__ = version("mpsearch")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["BIT_MENU", "Budget", "LayerTable", "load_quantized", "MPSearchError", "Scheme", "Spec", "SpecError", "Workload", "__version__"]
