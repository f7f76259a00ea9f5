"""Workloads: a model source, data and a loss, picked by name from small registries."""

from mpsearch.workload._workload import Evaluation, Workload, resolve_device
from mpsearch.workload.data import DATA_SOURCES, Examples
from mpsearch.workload.losses import LOSSES, Loss, Outputs, make_loss
from mpsearch.workload.models import MODEL_SOURCES, LoadedModel, minilm_dir

__all__ = [
    "Evaluation",
    "Workload",
    "resolve_device",
    "DATA_SOURCES",
    "Examples",
    "LOSSES",
    "Loss",
    "Outputs",
    "make_loss",
    "MODEL_SOURCES",
    "LoadedModel",
    "minilm_dir",
]
