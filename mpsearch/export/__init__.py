"""Export: a study's plan as a packed model, its plan document and deployment configs, and the loader.

``mpsearch export`` writes a folder (see :mod:`mpsearch.export.writer`);
:func:`load_quantized` runs it; :func:`evaluate_export` scores it on a workload.
The file layout is documented in ``FORMAT.md``, beside the code and in every export.
"""

from mpsearch.export.evaluate import evaluate_export
from mpsearch.export.loader import ExportError, load_quantized, read_plan
from mpsearch.export.document import PLAN_VERSION, PlanDocument
from mpsearch.export.writer import ExportResult, export_study

__all__ = ["ExportError", "ExportResult", "PLAN_VERSION", "PlanDocument", "evaluate_export", "export_study", "load_quantized", "read_plan"]
