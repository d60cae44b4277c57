"""Who may read ``/metrics``, ``/stats`` and the dashboard (they reveal room names and
identities): anyone when the server listens on loopback only, else a bearer monitoring token,
unless the operator explicitly made them public."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

TOKEN_ENV = "CASCADE_MONITOR_TOKEN"


def is_loopback(host: str) -> bool:
    """True if ``host`` (a listen address or name) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def startup_refusal(host: str, token: str | None, public: bool) -> str | None:
    """Why a server listening on ``host`` must not start with these settings, or None."""
    if is_loopback(host) or token or public:
        return None
    return (
        f"listening on {host} exposes /metrics, /stats and the dashboard: set a monitoring "
        f"token (--monitor-token-file or ${TOKEN_ENV}) or pass --public-metrics"
    )


@dataclass(frozen=True)
class AccessRule:
    """The access decision for one server."""

    token: str | None = None
    open: bool = False  # loopback-only listener, or --public-metrics

    @classmethod
    def for_listener(cls, host: str, token: str | None, public: bool) -> AccessRule:
        """The rule of a server listening on ``host``."""
        return cls(token=token or None, open=is_loopback(host) or public)

    def allows(self, authorization: str | None, query_token: str | None = None) -> bool:
        """Whether a request with this ``Authorization`` header (or ``?token=``) may read."""
        if self.open:
            return True
        if not self.token:
            return False
        presented = query_token
        if authorization and authorization.lower().startswith("bearer "):
            presented = authorization[7:].strip()
        return presented is not None and hmac.compare_digest(
            presented.encode(), self.token.encode()
        )
