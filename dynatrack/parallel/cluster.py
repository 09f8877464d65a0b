"""Connecting to Ray: a local Ray started (and stopped) on demand, or an existing cluster.

>>> with ray_session(num_cpus=2):           # doctest: +SKIP
...     ray.get(f.remote())

Token authentication stays as the cluster has it: a local Ray started here uses
Ray's defaults (token auth on for local clusters in Ray >= 2.59); for an
existing cluster, Ray reads the token from ``RAY_AUTH_TOKEN`` /
``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token`` as its docs describe.

Two things Ray leaves to the user, done here:

* Ray writes the token file it generates for a new local cluster (and for
  ``ray get-auth-token --generate``) with the process umask, usually readable by
  every user of the machine. Before starting a local Ray, :func:`ensure_private_token`
  writes that file itself, readable by its owner only (mode 0600), and warns about an
  existing token file that others can read.
* A client with a wrong or missing token retries for about 20 s and then reports
  "Failed to connect". :func:`ray_session` first asks the cluster's GCS for its id
  (one gRPC call with the token, a few seconds at most) and raises
  :class:`ClusterAuthError` ("authentication failure") when the cluster rejects it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from urllib.parse import urlparse

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A Ray cluster that cannot be reached or used."""


class ClusterAuthError(ClusterError):
    """The Ray cluster rejected this client's authentication token (or it has none)."""


def token_path() -> str:
    """The token file Ray reads: ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def write_token(path: str | os.PathLike[str]) -> bool:
    """Create a token file readable by its owner only (0600) with a fresh random token.

    Returns False, writing nothing, when the file exists (an existing token is never replaced).
    The token is never logged.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)  # O_CREAT's mode is masked by the umask; 0600 only ever narrows, but say it
    return True


def ensure_private_token() -> str | None:
    """Before a local Ray starts with token auth: make sure its token file is private.

    Token auth is on unless ``RAY_AUTH_MODE`` says otherwise; with ``RAY_AUTH_TOKEN`` set
    no file is used. A missing file is created with mode 0600 (Ray would create it
    world-readable); an existing one that group or others can read gets a warning naming
    it and the fix (``chmod 600``); it is not changed. Returns the file's path, or None.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if write_token(path):
        log.info("wrote a new Ray auth token to %s (mode 0600)", path)
    else:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning("the Ray auth token file %s is readable by other users (mode %o); run `chmod 600 %s`",
                        path, mode, path)
    return path


def _token_source() -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return "none: RAY_AUTH_MODE is not 'token' here, so no token was sent"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    path = token_path()
    return f"the file {path}" if os.path.exists(path) else f"none found (no RAY_AUTH_TOKEN, no file {path})"


def _check_auth(address: str, timeout: float) -> None:
    """One GCS call with this process's token; :class:`ClusterAuthError` if the cluster rejects it."""
    try:
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # Ray's internals moved: ray.init reports whatever is wrong
        return
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:
        AuthenticationError = RuntimeError  # type: ignore[misc,assignment]  # noqa: N806
    try:
        channel = init_grpc_channel(address)
    except (AuthenticationError, RuntimeError):  # token auth on here but no token anywhere: certain rejection
        channel = None
    try:
        if channel is not None:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
            return
    except AuthenticationError:  # raised while adding the token to the call: there is none
        pass
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            log.debug("GCS auth probe of %s: %s", address, exc.code())
            return
    finally:
        if channel is not None:
            channel.close()
    raise ClusterAuthError(
        f"authentication failure: the Ray cluster at {address!r} rejected this client's token "
        f"(token used: {_token_source()}). Use the cluster's token: RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN_PATH=<its token file> (or ~/.ray/auth_token, or RAY_AUTH_TOKEN)"
    )


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


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


class _NoTokenAuthOnNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to
    opt out" notice for the local Ray dynatrack starts (token auth on is the intended state, and the
    notice's advice is to turn it off); Ray's warning that auth is *disabled* still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, connect_timeout: float = 5.0,
                dashboard: bool = False) -> Iterator[None]:
    """Use Ray inside the block.

    ``dashboard``: start a local Ray with its dashboard (on 127.0.0.1), which serves Ray's state API,
    and point every process of it at that API (``RAY_API_SERVER_ADDRESS``). Ray Train needs this:
    every ``TorchTrainer`` run's placement-group cleaner asks the state API whether the Train
    controller is alive, and a process that finds the API by auto-detection follows
    ``/tmp/ray/ray_current_cluster``, which a killed ``ray start`` leaves pointing at a dead cluster:
    each ask then hangs past the cleaner's 12 s stop timeout, and every Train run's teardown took 12 s
    more (measured). The analysis engine, which has no Train runs, leaves the dashboard off.

    ``address=None`` starts a local Ray with ``num_cpus`` CPUs and shuts it down
    afterwards; an already initialized Ray (e.g. inside ``ray job submit``) is
    reused as is. Otherwise connect to ``address`` (``"auto"``, ``host:port``,
    ``ray://host:port``) after checking within ``connect_timeout`` seconds that
    something is listening, so a wrong address is an error, not a hang, and (for a
    ``host:port`` GCS address) that the cluster accepts this client's token
    (:class:`ClusterAuthError`, "authentication failure", otherwise).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    started = False
    if address is None and os.environ.get("RAY_ADDRESS") is None:
        ensure_private_token()
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        if not any(isinstance(f, _NoTokenAuthOnNotice) for f in auth_log.filters):
            auth_log.addFilter(_NoTokenAuthOnNotice())
        extra: dict = {"include_dashboard": dashboard}
        env_before = os.environ.get(API_SERVER_ENV)
        if dashboard:
            extra.update(dashboard_host="127.0.0.1", dashboard_port=_free_port())
            # the raylet, hence every worker it starts, inherits the variable; this process gets its own back
            os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{extra['dashboard_port']}"
        try:
            # address="local": always a fresh local instance, never a cluster that `ray start` left running
            ray.init(address="local", num_cpus=num_cpus, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False, **extra)
        finally:
            if dashboard:
                os.environ.pop(API_SERVER_ENV, None)
                if env_before is not None:
                    os.environ[API_SERVER_ENV] = env_before
        started = True
    else:
        target = address or os.environ["RAY_ADDRESS"]
        _probe_address(target, connect_timeout)
        if not target.startswith(("ray://", "http://", "https://")) and target not in ("auto", "local"):
            _check_auth(target, connect_timeout)
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
