"""Ray itself: start a local instance or join a cluster, with the client environment Ray 2.60 needs,
and fail fast on an address nothing listens on."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from mpsearch.errors import MPSearchError, first_line


def start_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (``HOST:PORT`` of its head, or ``auto`` inside a
    Ray job), or start a local one; once per process."""
    if address:
        os.environ.update(ray_client_env())
        check_reachable(address)
    elif "ray" not in sys.modules:
        # A new local Ray turns token auth on by default and prints a banner saying so on every
        # start; choosing that same mode explicitly keeps the auth and drops the banner. A mode
        # the user set is left alone, and so is a Ray imported already (it read its mode then).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:  # a new local Ray, whatever else runs on this machine
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray"
        raise MPSearchError(f"cannot start or reach Ray at {where} ({first_line(e)}); check --address or `ray status`") from None


def ray_client_env() -> dict[str, str]:
    """Environment for a client of an existing cluster.

    A Ray 2.60 head runs with token auth when it finds a token (``~/.ray/auth_token``, which a
    local ``ray.init`` creates, or ``$RAY_AUTH_TOKEN``), but a client only sends its token in
    ``RAY_AUTH_MODE=token``, read when Ray is first imported. Sending one to a head without auth
    does no harm, so: token mode whenever a token exists and the user chose no mode.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return {}
    if os.environ.get("RAY_AUTH_TOKEN") or Path("~/.ray/auth_token").expanduser().exists():
        return {"RAY_AUTH_MODE": "token"}
    return {}


def probe(host: str, port: int, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at ``host:port`` over TCP, or None when something does.

    >>> probe("127.0.0.1", 9) is not None  # the discard port: nothing listens here
    True
    """
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return e.strerror or first_line(e)
    return None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nothing listens on (Ray itself retries for minutes)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        if address == "auto":
            return
        raise MPSearchError(f"--address {address!r} is not HOST:PORT (the head's GCS port, 6379 unless changed)")
    problem = probe(host, int(port), timeout_s)
    if problem:
        raise MPSearchError(f"cannot start or reach Ray at {address} ({problem}); check --address or `ray status`")
