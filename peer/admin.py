"""Who may run admin actions (drain) on a node: pure checks, no I/O.

Two credentials are accepted in the ``Authorization`` header:

- ``Bearer <admin token>``: the node's admin token (``--admin-token-file`` or
  ``$CASCADE_ADMIN_TOKEN``), compared in constant time;
- ``CascadeNode <unix time>.<signature>``: an Ed25519 signature by the node's own identity
  key (``--key``) over ``cascade-admin``, the action and the time, valid for
  :data:`MAX_SKEW` seconds either side of the node's clock. Whoever holds the node's key
  may administer it without any shared secret.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from enum import Enum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ADMIN_TOKEN_ENV = "CASCADE_ADMIN_TOKEN"
MAX_SKEW = 60.0
NODE_SCHEME = "CascadeNode"


class AdminRefusal(Enum):
    """Why an admin request was refused."""

    MISSING = "missing_credentials"
    MALFORMED = "malformed_credentials"
    BAD_TOKEN = "bad_token"
    NO_TOKEN_CONFIGURED = "admin_token_not_configured"
    BAD_SIGNATURE = "bad_signature"
    STALE = "stale_signature"


def _signed_text(action: str, timestamp: int) -> bytes:
    return f"cascade-admin\n{action}\n{timestamp}".encode()


def node_authorization(key: Ed25519PrivateKey, action: str, now: float) -> str:
    """The ``Authorization`` header value proving possession of the node key."""
    timestamp = int(now)
    signature = key.sign(_signed_text(action, timestamp))
    encoded = base64.urlsafe_b64encode(signature).decode().rstrip("=")
    return f"{NODE_SCHEME} {timestamp}.{encoded}"


def check_admin(
    header: str | None,
    *,
    action: str,
    now: float,
    node_key: Ed25519PublicKey,
    admin_token: str | None,
) -> AdminRefusal | None:
    """None if ``header`` authorizes ``action``, else the reason it does not."""
    if not header:
        return AdminRefusal.MISSING
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme == "Bearer":
        if not admin_token:
            return AdminRefusal.NO_TOKEN_CONFIGURED
        if hmac.compare_digest(value.encode(), admin_token.encode()):
            return None
        return AdminRefusal.BAD_TOKEN
    if scheme != NODE_SCHEME:
        return AdminRefusal.MALFORMED
    stamp, dot, encoded = value.partition(".")
    if not dot or not stamp.isdigit() or len(stamp) > 12 or len(encoded) > 100:
        return AdminRefusal.MALFORMED
    try:
        signature = base64.b64decode(
            encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True
        )
    except (binascii.Error, ValueError):
        return AdminRefusal.MALFORMED
    timestamp = int(stamp)
    if abs(now - timestamp) > MAX_SKEW:
        return AdminRefusal.STALE
    try:
        node_key.verify(signature, _signed_text(action, timestamp))
    except InvalidSignature:
        return AdminRefusal.BAD_SIGNATURE
    return None
