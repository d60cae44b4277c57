"""Room-scoped, expiring access tokens (JWT).

Two ways to sign, so that every node of a fleet accepts the same token:

- **EdDSA** (Ed25519 application key): whoever mints tokens holds the private key; nodes get
  only the public key (``cascade node --token-key app.pub``), so a node never holds what mints.
- **HS256** (shared secret, at least 32 bytes): simple setups; every node holds the secret.

A node may trust both. The algorithm a token claims must be one the node has a key for (no
algorithm confusion), and a token signed by any other key is refused with ``untrusted_token``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peer.signaling import RoomName

ISSUER = "cascade"
MIN_SECRET_BYTES = 32
MAX_TTL = 30 * 86400.0

SigningKey = str | Ed25519PrivateKey
"""An HS256 secret (str) or an Ed25519 application private key."""


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


class KeyMaterialError(ValueError):
    """A secret or key cannot be used (too short, wrong type, not PEM)."""


def new_secret() -> str:
    """A fresh random HS256 API secret."""
    return secrets.token_urlsafe(32)


def check_secret(secret: str) -> str:
    """Return ``secret`` if it is long enough for HS256, else raise ValueError."""
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise KeyMaterialError(
            f"API secret is {len(secret.encode())} bytes; at least {MIN_SECRET_BYTES} are needed"
        )
    return secret


def check_room(room: str) -> str:
    """Return ``room`` if it is a valid room name (as ``join`` accepts), else raise ValueError."""
    try:
        return msgspec.convert(room, RoomName)
    except msgspec.ValidationError:
        raise ValueError(
            f"invalid room name {room!r}: 1-128 letters, digits, '_', '-' or '.'"
        ) from None


def load_signing_key(pem: bytes) -> Ed25519PrivateKey:
    """Parse a PEM (PKCS#8) Ed25519 private key, as ``cascade keygen`` writes."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise KeyMaterialError("not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyMaterialError("not an Ed25519 private key")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Parse a PEM Ed25519 public key, as ``cascade pubkey`` writes; refuses private keys."""
    if b"PRIVATE KEY" in pem:
        raise KeyMaterialError(
            "this is a private key; give nodes only the public key (cascade pubkey)"
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise KeyMaterialError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError("not an Ed25519 public key")
    return key


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The PEM public key to hand to nodes (``--token-key``)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def issue_token(
    key: SigningKey,
    room: str,
    identity: str,
    *,
    ttl: float = 3600,
    publish: bool = True,
    subscribe: bool = True,
    now: float | None = None,
) -> str:
    """Sign a token for ``identity`` in ``room``, valid for ``ttl`` seconds.

    ``key`` is an HS256 secret (str) or an Ed25519 private key (EdDSA). Raises ValueError
    for a short secret, an invalid room name, an empty identity or a TTL out of range.
    """
    check_room(room)
    if not identity:
        raise ValueError("identity must not be empty")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL:.0f} seconds")
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": ISSUER,
        "sub": identity,
        "room": room,
        "iat": issued,
        "exp": issued + max(1, int(ttl)),
        "grants": {"publish": publish, "subscribe": subscribe},
    }
    if isinstance(key, Ed25519PrivateKey):
        return jwt.encode(claims, key, algorithm="EdDSA")
    return jwt.encode(claims, check_secret(key), algorithm="HS256")


class TokenVerifier:
    """What a node trusts: an HS256 secret, an Ed25519 public key, or both."""

    def __init__(
        self, *, secret: str | None = None, public_key: Ed25519PublicKey | None = None
    ) -> None:
        if secret is None and public_key is None:
            raise ValueError("a token verifier needs a secret or a public key")
        self._keys: dict[str, str | Ed25519PublicKey] = {}
        if secret is not None:
            self._keys["HS256"] = check_secret(secret)
        if public_key is not None:
            self._keys["EdDSA"] = public_key

    @property
    def algorithms(self) -> list[str]:
        """The JWT algorithms this verifier accepts."""
        return sorted(self._keys)

    def verify(self, token: str, room: str, *, now: float | None = None) -> Grant:
        """Check algorithm, signature, expiry and room; return the grant or raise
        :class:`TokenError` (``bad_token``, ``untrusted_token``, ``token_expired``,
        ``forbidden``)."""
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError as exc:
            raise TokenError("bad_token", f"access token malformed: {exc}") from None
        key = self._keys.get(str(algorithm))
        if key is None:
            raise TokenError(
                "untrusted_token",
                f"token signed with {algorithm}; this node accepts only "
                f"{', '.join(self.algorithms)}",
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                issuer=ISSUER,
                options={"require": ["exp", "sub", "iss"], "verify_exp": now is None},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token_expired", "access token has expired") from None
        except jwt.InvalidSignatureError:
            raise TokenError(
                "untrusted_token", "token signed by a key this node does not trust"
            ) from None
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


def verify_token(
    trusted: str | TokenVerifier, token: str, room: str, *, now: float | None = None
) -> Grant:
    """Verify with a :class:`TokenVerifier` or an HS256 secret."""
    verifier = trusted if isinstance(trusted, TokenVerifier) else TokenVerifier(secret=trusted)
    return verifier.verify(token, room, now=now)
