"""Node authentication: self-signed Ed25519 certificates and the control-stream challenge.

aioquic 1.7.2 can only *request* a client certificate through a private, test-only
flag (``tls.Context._request_client_certificate``) and offers no TLS exporter, so
authentication is split in two (details in docs/relay-protocol.md):

* the **server** is authenticated by TLS itself: its certificate is self-signed with
  its node key, TLS 1.3 CertificateVerify proves possession, and the dialler checks
  that the certificate key equals the node key it meant to reach;
* the **client** (and, redundantly, the server again) is authenticated by signatures
  over a transcript of both node keys and two fresh nonces exchanged on the control
  stream, before any subscription or media is accepted.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

__all__ = [
    "make_certificate",
    "public_key_bytes",
    "sign_transcript",
    "transcript",
    "verify_transcript",
]

_CONTEXT = b"cascade-relay/1 auth\x00"


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """Raw 32-byte Ed25519 public key (the node id used everywhere in the relay)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def make_certificate(key: Ed25519PrivateKey, days: int = 3650) -> x509.Certificate:
    """A self-signed X.509 certificate carrying (and signed by) the node key."""
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "cascade-" + public_key_bytes(key).hex()[:32])]
    )
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, algorithm=None)
    )


def certificate_key(cert: x509.Certificate | None) -> bytes | None:
    """Raw Ed25519 key of a peer certificate, or None if it is not an Ed25519 certificate."""
    if cert is None:
        return None
    try:
        pub = cert.public_key()
    except Exception:
        return None
    if not isinstance(pub, Ed25519PublicKey):
        return None
    return public_key_bytes(pub)


def transcript(
    role: bytes, client_key: bytes, server_key: bytes, client_nonce: bytes, server_nonce: bytes
) -> bytes:
    """Bytes signed by ``role`` (b"client" or b"server") during the handshake."""
    return b"".join((_CONTEXT, role, b"\x00", client_key, server_key, client_nonce, server_nonce))


def sign_transcript(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Sign a :func:`transcript`."""
    return key.sign(data)


def verify_transcript(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` over ``data`` is valid for the raw ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
