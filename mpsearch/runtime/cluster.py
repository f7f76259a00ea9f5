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
    Ray job), or start a local one; once per process.

    A cluster's head runs with token auth or without, and a client must match it: a token sent
    to a head without auth breaks its actors, and a head with auth refuses a client without one.
    Unless ``RAY_AUTH_MODE`` says which, a client connects with the token it has
    (``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) only when the head refuses a client without.
    """
    chosen = False
    if address:
        check_reachable(address)
    elif "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        # A new local Ray turns token auth on by default and prints a banner saying so on every
        # start; choosing that same mode explicitly keeps the auth and drops the banner. A mode
        # the user set is left alone, and so is a Ray imported already (it read its mode then).
        os.environ["RAY_AUTH_MODE"] = "token"
        chosen = True
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if not address:  # a new local Ray, whatever else runs on this machine
            try:
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
            finally:
                # Ray and the raylet it started have read the mode; a process this one starts
                # later must not inherit it: a driver in token mode joining a head without auth
                # connects, but the head cannot call it back (InvalidAuthToken) and its actors die.
                if chosen:
                    os.environ.pop("RAY_AUTH_MODE", None)
            return
        if ray_client_env() and _needs_token(address):
            _token_mode()
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError:
            # With a token only where the head asks for one: a driver in token mode on a head
            # without auth connects, but the head's raylet cannot call it back (InvalidAuthToken)
            # and its actors die. Refused for another reason (a loaded head), it tries once more
            # as it was (seen once in CI: the actors of a cluster scan died that way).
            ray.shutdown()
            if ray_client_env() and _needs_token(address):
                _token_mode()
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray"
        raise MPSearchError(f"cannot start or reach Ray at {where} ({first_line(e)}); check --address or `ray status`") from None


def _needs_token(address: str) -> bool:
    """Whether the head at ``address`` refuses a client without a token: one read of its key-value
    store, a fraction of a second (a refused ``ray.init`` retries for about 20 s)."""
    try:
        from ray._raylet import GcsClient

        GcsClient(address=address.split("://", 1)[-1]).internal_kv_get(b"mpsearch-probe", None, timeout=5)
    except Exception as e:  # noqa: BLE001 - Ray's AuthenticationError; anything else: ray.init will say
        return "Authentication" in type(e).__name__ or "InvalidAuthToken" in str(e)
    return False


def _token_mode() -> None:
    """This process's Ray sends its token from now on (Ray reads the mode into its config)."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()


def ray_client_env() -> dict[str, str]:
    """Environment for a client of a cluster's HTTP side (the Jobs API, ``ray list``).

    A Ray 2.60 head runs with token auth when it finds a token at its start (``~/.ray/auth_token``,
    which a local ``ray.init`` creates, or ``$RAY_AUTH_TOKEN``), and a client sends its token only
    in ``RAY_AUTH_MODE=token``. Over HTTP a token sent to a head without auth is ignored, so: token
    mode whenever a token exists and the user chose no mode. (Not so for a driver's GCS connection:
    :func:`start_ray` tries without first.)
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
