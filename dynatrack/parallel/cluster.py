"""Connecting to Ray: a local Ray started (and stopped) on demand, or an existing cluster.

>>> with ray_session(num_cpus=2):           # doctest: +SKIP
...     ray.get(f.remote())

Token authentication stays as the cluster has it: a local Ray started here uses
Ray's defaults (token auth on for local clusters in Ray >= 2.59); for an
existing cluster, Ray reads the token from ``RAY_AUTH_TOKEN`` /
``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token`` as its docs describe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A Ray cluster that cannot be reached or used."""


def _probe_address(address: str, timeout: float) -> None:
    """Fail within ``timeout`` seconds if nothing listens at a ``host:port`` address."""
    if address in ("auto", "local") or address.startswith("ray://"):
        target = address[len("ray://"):] if address.startswith("ray://") else None
    else:
        target = address
    if target is None:
        return
    parsed = urlparse(target if "://" in target else f"tcp://{target}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ClusterError(f"Ray address {address!r} is not host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address!r} ({exc}); check the address and that the head node "
            "is running (`ray status`), or omit --address to use a local Ray"
        ) from exc


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, connect_timeout: float = 5.0) -> Iterator[None]:
    """Use Ray inside the block.

    ``address=None`` starts a local Ray with ``num_cpus`` CPUs and shuts it down
    afterwards; an already initialized Ray (e.g. inside ``ray job submit``) is
    reused as is. Otherwise connect to ``address`` (``"auto"``, ``host:port``,
    ``ray://host:port``) after checking within ``connect_timeout`` seconds that
    something is listening, so a wrong address is an error, not a hang.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    started = False
    if address is None and os.environ.get("RAY_ADDRESS") is None:
        # address="local": always a fresh local instance, never a cluster that `ray start` left running
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
        started = True
    else:
        target = address or os.environ["RAY_ADDRESS"]
        _probe_address(target, connect_timeout)
        try:
            ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - re-raised with the address named
            raise ClusterError(f"cannot connect to the Ray cluster at {target!r}: {exc}") from exc
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()
