"""Sensitivity: how much quantizing each layer hurts — Hessian traces, perturbation, Fisher.

Each method registers itself in :data:`SENSITIVITY` (see :mod:`mpsearch.sensitivity.profile`);
importing this package registers the three built in. :func:`analyze` computes a profile or
reads it back: from the database, or from the disk cache beside the banks (a new database).
"""

from mpsearch.sensitivity import fisher, hessian, perturbation  # noqa: F401 - each registers its method
from mpsearch.sensitivity.analyze import analyze, plot
from mpsearch.sensitivity.profile import SENSITIVITY, Method, Options, Profile, rank

__all__ = ["SENSITIVITY", "Method", "Options", "Profile", "analyze", "plot", "rank"]
