"""Connecting to a Ray cluster's Jobs API (the dashboard's HTTP server, port 8265 by default).

``ray`` is imported lazily so that ``ckf --help`` stays fast on a laptop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_DASHBOARD_PORT = 8265
# Ray reads these in JobSubmissionClient() and lets them override the address argument.
_RAY_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


from ckf_dist.errors import LaunchError  # noqa: E402  (re-exported)


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: ``address``, else $RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS,
    else ``http://127.0.0.1:8265``. ``HEAD`` and ``HEAD:PORT`` get ``http://`` (and :8265)."""
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS", "")
    if not address:
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise LaunchError(
            f"{address} is a Ray Client address; `ckf submit` talks to the Jobs API of the "
            f"dashboard instead: use --address http://HEAD:{DEFAULT_DASHBOARD_PORT}"
        )
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LaunchError(f"--address {address!r}: expected http://HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    if parts.port is None and parts.scheme == "http":
        address = f"{address}:{DEFAULT_DASHBOARD_PORT}"
    return address


@contextlib.contextmanager
def _explicit_address():
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client resolves its address, so
    that the address the user typed is the one used (Ray would silently prefer the env)."""
    saved = {k: os.environ.pop(k) for k in _RAY_ADDRESS_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _unreachable_hint(address: str) -> str:
    port = urlsplit(address).port
    hint = ""
    if port in (6379, 10001):
        hint = (
            f"\n  Port {port} is Ray's {'GCS' if port == 6379 else 'client server'} port; "
            f"the Jobs API is served by the dashboard (port {DEFAULT_DASHBOARD_PORT} by default)."
        )
    return (
        f"{hint}\n  Is a Ray cluster with its dashboard running there? Start one on this machine with"
        f"\n    ray start --head --dashboard-host=127.0.0.1 --dashboard-port={DEFAULT_DASHBOARD_PORT}"
        f"\n  or, for a remote cluster whose dashboard listens on 127.0.0.1, open a tunnel first"
        f"\n  (`ray dashboard cluster/aws.yaml`, or `kubectl port-forward svc/ckf-head-svc 8265:8265`)"
        f"\n  and pass --address {DEFAULT_ADDRESS}. See launch/README.md."
    )


def _quiet_ray_sdk_logs() -> None:
    # Ray's SDK logs each upload and websocket close at INFO; our own lines say it better.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)


def connect(address: str | None = None, headers: dict | None = None):
    """A ``JobSubmissionClient`` for ``address``; raises :class:`LaunchError` naming the
    address when the Jobs API cannot be reached."""
    url = resolve_address(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        raise LaunchError(f"ray is not installed ({exc}); install ckf-dist with its dependencies") from None
    _quiet_ray_sdk_logs()
    try:
        with _explicit_address():
            return JobSubmissionClient(url, headers=headers)
    except ConnectionError as exc:
        raise LaunchError(f"cannot reach the Ray Jobs API at {url} ({exc}){_unreachable_hint(url)}") from None
    except RuntimeError as exc:
        text = str(exc)
        if "ray[default]" in text:
            raise LaunchError(
                "submitting jobs needs Ray's dashboard client: pip install 'ray[default]' "
                "(ckf-dist installs it with its dependencies)"
            ) from None
        raise LaunchError(f"the Ray Jobs API at {url} refused the connection: {text}") from None
    except Exception as exc:  # requests errors (bad TLS, timeouts) carry no address
        raise LaunchError(f"cannot use the Ray Jobs API at {url}: {type(exc).__name__}: {exc}") from None


def job_not_found(exc: Exception, job_id: str, address: str) -> LaunchError:
    """Translate Ray's 'Request failed with status code 404' into a message a user can act on."""
    text = str(exc)
    if "404" in text or "does not exist" in text:
        return LaunchError(f"no job {job_id!r} on {address}; list the jobs with `ckf jobs list --address {address}`")
    return LaunchError(f"job {job_id!r} on {address}: {text}")
