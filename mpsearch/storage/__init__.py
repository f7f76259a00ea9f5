"""Storage: one database URL for Optuna's trials and mpsearch's jobs, profiles and exports.

SQLite (a file, no server) by default, PostgreSQL for clusters; the schema of mpsearch's
own tables is managed by the Alembic migrations in the top-level ``alembic/`` folder.
"""

from mpsearch.storage.database import DEFAULT_URL, parse_url
from mpsearch.storage.models import JOB_STATES, Export, ExportFile, Job, JobEvent, SensitivityProfile
from mpsearch.storage.store import ATTR_BPW, ATTR_BYTES, ATTR_ERROR, ATTR_PLAN, ProfileKey, Storage

__all__ = [
    "ATTR_BPW",
    "ATTR_BYTES",
    "ATTR_ERROR",
    "ATTR_PLAN",
    "DEFAULT_URL",
    "Export",
    "ExportFile",
    "JOB_STATES",
    "Job",
    "JobEvent",
    "ProfileKey",
    "SensitivityProfile",
    "Storage",
    "parse_url",
]
