"""The Ray runtime: scorers (one workload, one bank, plans in, losses out), the pool that runs
them as Ray actors on CPUs or GPUs, and starting or joining a Ray cluster.

Sensitivity, search and the service use it; it uses none of them, and it never touches the
database.
"""

from mpsearch.runtime.cluster import check_reachable, probe, ray_client_env, start_ray
from mpsearch.runtime.pool import ScorerPool
from mpsearch.runtime.scorer import Scorer, Split

__all__ = ["Scorer", "ScorerPool", "Split", "check_reachable", "probe", "ray_client_env", "start_ray"]
