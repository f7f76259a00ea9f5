"""Storage: one database URL for Optuna's trials and mpsearch's jobs, profiles and exports.

SQLite (a file, no server) by default, PostgreSQL for clusters. The trial log
(:mod:`mpsearch.storage.trials`) reads and writes a study's trials in Optuna's own tables and is
the only code that touches Optuna's internals; mpsearch's own records are SQLAlchemy models
(:mod:`mpsearch.storage.models`) whose schema the Alembic migrations in the top-level
``alembic/`` folder manage.
"""

from mpsearch.storage.database import DEFAULT_URL, parse_url
from mpsearch.storage.models import JOB_STATES, Export, ExportFile, Job, JobEvent, SensitivityProfile
from mpsearch.storage.store import ProfileKey, Storage
from mpsearch.storage.trials import Outcome, TrialLog, TrialRecord

__all__ = [
    "DEFAULT_URL",
    "Export",
    "ExportFile",
    "JOB_STATES",
    "Job",
    "JobEvent",
    "Outcome",
    "ProfileKey",
    "SensitivityProfile",
    "Storage",
    "TrialLog",
    "TrialRecord",
    "parse_url",
]
