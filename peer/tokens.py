"""Room-scoped, expiring access tokens (JWT, HS256) signed with the node's API secret."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import jwt

ISSUER = "cascade"
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows."""

    room: str
    identity: str
    can_publish: bool
    can_subscribe: bool
    expires_at: int


class TokenError(Exception):
    """A token was refused; ``code`` is the signaling error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def new_secret() -> str:
    """A fresh random API secret."""
    return secrets.token_urlsafe(32)


def issue_token(
    secret: str,
    room: str,
    identity: str,
    *,
    ttl: float = 3600,
    publish: bool = True,
    subscribe: bool = True,
    now: float | None = None,
) -> str:
    """Sign a token for ``identity`` in ``room``, valid for ``ttl`` seconds."""
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"API secret must be at least {MIN_SECRET_BYTES} bytes")
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": ISSUER,
        "sub": identity,
        "room": room,
        "iat": issued,
        "exp": issued + int(ttl),
        "grants": {"publish": publish, "subscribe": subscribe},
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(secret: str, token: str, room: str, *, now: float | None = None) -> Grant:
    """Check signature, expiry and room; return the grant or raise :class:`TokenError`."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            issuer=ISSUER,
            options={"require": ["exp", "sub", "iss"], "verify_exp": now is None},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token_expired", "access token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise TokenError("bad_token", f"access token rejected: {exc}") from None
    if now is not None and claims["exp"] <= now:
        raise TokenError("token_expired", "access token has expired")
    if claims.get("room") != room:
        raise TokenError("forbidden", f"token is not valid for room {room!r}")
    grants = claims.get("grants") or {}
    if not isinstance(grants, dict):
        raise TokenError("bad_token", "token grants malformed")
    return Grant(
        room=room,
        identity=str(claims["sub"]),
        can_publish=bool(grants.get("publish", False)),
        can_subscribe=bool(grants.get("subscribe", False)),
        expires_at=int(claims["exp"]),
    )
