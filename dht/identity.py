"""Ed25519 node identity: key files, node ids and fleet certificates (no networking)."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

NODE_ID_BYTES = 20
"""Node ids are 160 bits, the Kademlia id space."""

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

_NODE_ID_DOMAIN = b"cascade/node-id/v1\x00"
CERTIFICATE_DOMAIN = b"cascade/fleet-certificate/v1\x00"


class IdentityError(Exception):
    """A key file or certificate could not be used."""


def node_id_from_public_key(public_key: bytes) -> bytes:
    """Derive the 20-byte node id from a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(_NODE_ID_DOMAIN + public_key).digest()[:NODE_ID_BYTES]


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Return True if ``signature`` is a valid Ed25519 signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class NodeIdentity:
    """An Ed25519 key pair and the node id derived from it."""

    private_key: Ed25519PrivateKey
    public_key: bytes
    node_id: bytes

    @classmethod
    def generate(cls) -> NodeIdentity:
        """Create a fresh random identity."""
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> NodeIdentity:
        """Wrap an existing private key."""
        public = private_key.public_key().public_bytes_raw()
        return cls(private_key, public, node_id_from_public_key(public))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Read a PEM (PKCS#8) key file; refuse files readable by group or others."""
        file = Path(path)
        try:
            mode = file.stat().st_mode
            data = file.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read key file {file}: {exc}") from exc
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(f"key file {file} is accessible by others (chmod 600 it)")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"key file {file} is not a PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {file} does not hold an Ed25519 key")
        return cls.from_private_key(key)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the private key as PEM to a new file created with mode 0600."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError as exc:
            raise IdentityError(f"key file {path} already exists") from exc
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
        finally:
            os.close(fd)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Load the key file, creating it (mode 0600) if it does not exist."""
        if Path(path).exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    @property
    def node_id_hex(self) -> str:
        """The node id as lowercase hex."""
        return self.node_id.hex()

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with the private key (64-byte signature)."""
        return self.private_key.sign(message)


class Certificate(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Fleet admission: an operator key vouches for a node key until ``not_after_ms``."""

    node_public_key: bytes
    not_after_ms: int
    signature: bytes

    def signed_bytes(self) -> bytes:
        """The bytes the operator signs."""
        return _certificate_message(self.node_public_key, self.not_after_ms)


def _certificate_message(node_public_key: bytes, not_after_ms: int) -> bytes:
    return CERTIFICATE_DOMAIN + node_public_key + not_after_ms.to_bytes(8, "big")


def issue_certificate(
    operator: NodeIdentity, node_public_key: bytes, *, valid_for: float = 365 * 86400.0
) -> bytes:
    """Sign ``node_public_key`` with the operator key; returns the encoded certificate."""
    if len(node_public_key) != PUBLIC_KEY_BYTES:
        raise ValueError("an Ed25519 public key is 32 bytes")
    not_after_ms = int((time.time() + valid_for) * 1000)
    signature = operator.sign(_certificate_message(node_public_key, not_after_ms))
    return msgspec.msgpack.encode(Certificate(node_public_key, not_after_ms, signature))


def check_certificate(
    certificate: bytes, *, operator_public_key: bytes, node_public_key: bytes, now: float
) -> bool:
    """True if ``certificate`` is an unexpired operator signature over ``node_public_key``."""
    try:
        cert = msgspec.msgpack.decode(certificate, type=Certificate)
    except msgspec.DecodeError:
        return False
    if cert.node_public_key != node_public_key or cert.not_after_ms < now * 1000:
        return False
    return verify_signature(operator_public_key, cert.signature, cert.signed_bytes())
