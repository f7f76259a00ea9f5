"""Export: a study's plan as a packed model, its plan document and deployment configs, and the loader.

``mpsearch export`` writes a folder (see :mod:`mpsearch.export.writer`);
:func:`load_quantized` runs it; :func:`evaluate_export` scores it on a workload.
The file layout is documented in ``FORMAT.md``, beside the code and in every export.
Deployment formats besides mpsearch's own are in :mod:`mpsearch.export.targets`.

The names below are imported on first use, so the CLI can read :data:`~mpsearch.export.targets.TARGETS`
without loading torch.
"""

from importlib import import_module

_WHERE = {
    "evaluate_export": "evaluate", "ExportError": "loader", "load_quantized": "loader", "read_plan": "loader",
    "PLAN_VERSION": "document", "PlanDocument": "document", "ExportResult": "writer", "export_study": "writer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"mpsearch.export.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mpsearch.export' has no attribute {name!r}")
