"""Sans-I/O authentication state machines of a relay connection (both roles).

The QUIC server is authenticated by TLS (its certificate carries its node key); both
sides then prove their node keys by signing a transcript on the control stream
(:mod:`relay.auth`, docs/relay-protocol.md). Each machine takes control messages and
returns the messages to send; a refusal raises :class:`HandshakeRefused` carrying the
application error code the connection closes with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import auth
from .protocol import ALPN, PROTOCOL_VERSION, Auth, AuthOk, ControlMessage, ErrorCode, Hello

__all__ = ["ClientHandshake", "HandshakeRefused", "ServerHandshake"]

log = logging.getLogger(__name__)


class HandshakeRefused(Exception):
    """The handshake failed: close the connection with ``code``.

    ``refused`` is True when the peer failed to prove it is an authorised node (counted
    in ``RelayCounters.auth_refused``), False for a plain protocol error.
    """

    def __init__(self, code: int, reason: str, refused: bool = True) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.refused = refused


class ClientHandshake:
    """The dialler's side: checks the server's certificate key and signature, then signs.

    Call :meth:`tls_done` when the TLS handshake completes (returns the first message),
    then :meth:`on_message` for each control message until :attr:`done`.
    """

    def __init__(
        self, private_key: Ed25519PrivateKey, peer_key: bytes, public_key: bytes | None = None
    ) -> None:
        self.private_key = private_key
        #: the key this node claims (normally the private key's own)
        self.public_key = public_key or auth.public_key_bytes(private_key)
        self.peer_key = peer_key
        self.nonce = os.urandom(32)
        self.hello_at: float | None = None
        self.signed = False
        self.done = False

    def tls_done(self, alpn: str | None, cert_key: bytes | None, now: float) -> Hello:
        """TLS finished with ``alpn`` and the server certificate's key (None if unreadable)."""
        if alpn != ALPN:
            raise HandshakeRefused(ErrorCode.PROTOCOL_VIOLATION, "ALPN mismatch", refused=False)
        if cert_key != self.peer_key:
            # without the certificate check the control-stream signatures alone would not
            # stop a man in the middle relaying them between two TLS sessions: fail closed
            reason = (
                "server certificate is not the expected node key"
                if cert_key is not None
                else "cannot read the server certificate"
            )
            raise HandshakeRefused(ErrorCode.WRONG_PEER, reason)
        self.hello_at = now
        return Hello(PROTOCOL_VERSION, self.public_key, self.nonce)

    def on_message(self, msg: ControlMessage) -> ControlMessage | None:
        """The next message to send (None once authenticated); raises on refusal."""
        if isinstance(msg, Hello) and self.hello_at is not None and not self.signed:
            if msg.public_key != self.peer_key:
                raise HandshakeRefused(ErrorCode.WRONG_PEER, "peer is not the expected node key")
            data = auth.transcript(b"server", self.public_key, self.peer_key, self.nonce, msg.nonce)
            if not auth.verify_transcript(self.peer_key, msg.signature, data):
                raise HandshakeRefused(ErrorCode.AUTH_FAILED, "server signature invalid")
            data = auth.transcript(b"client", self.public_key, self.peer_key, self.nonce, msg.nonce)
            self.signed = True
            return Auth(auth.sign_transcript(self.private_key, data))
        if isinstance(msg, AuthOk) and self.signed:
            self.done = True
            return None
        raise HandshakeRefused(
            ErrorCode.PROTOCOL_VIOLATION, "unexpected message during auth", refused=False
        )


class ServerHandshake:
    """The listener's side: asks ``authorize(peer_key)``, signs, checks the client's signature."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        authorize: Callable[[bytes], bool],
        public_key: bytes | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = public_key or auth.public_key_bytes(private_key)
        self.authorize = authorize
        self.peer_key: bytes | None = None
        self._client_nonce = b""
        self._server_nonce = b""
        self.done = False

    def on_message(self, msg: ControlMessage) -> ControlMessage:
        """The message to send back; raises :class:`HandshakeRefused`."""
        if isinstance(msg, Hello) and not self._client_nonce:
            if msg.version != PROTOCOL_VERSION:
                raise HandshakeRefused(
                    ErrorCode.UNSUPPORTED_VERSION, f"version {msg.version} unsupported", False
                )
            self.peer_key = msg.public_key
            try:
                allowed = self.authorize(msg.public_key)
            except Exception:
                log.exception("relay: authorize callback failed")
                allowed = False
            if not allowed:
                raise HandshakeRefused(ErrorCode.UNAUTHORIZED, "node key not authorized")
            self._client_nonce = msg.nonce
            self._server_nonce = os.urandom(32)
            data = auth.transcript(
                b"server", msg.public_key, self.public_key, msg.nonce, self._server_nonce
            )
            sig = auth.sign_transcript(self.private_key, data)
            return Hello(PROTOCOL_VERSION, self.public_key, self._server_nonce, sig)
        if isinstance(msg, Auth) and self._client_nonce and self.peer_key is not None:
            data = auth.transcript(
                b"client", self.peer_key, self.public_key, self._client_nonce, self._server_nonce
            )
            if not auth.verify_transcript(self.peer_key, msg.signature, data):
                raise HandshakeRefused(ErrorCode.AUTH_FAILED, "client signature invalid")
            self.done = True
            return AuthOk()
        raise HandshakeRefused(ErrorCode.PROTOCOL_VIOLATION, "message before authentication")
