"""Access tokens: HS256 secrets and Ed25519 application keys, tables of what is accepted."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.tokens import (
    KeyMaterialError,
    TokenError,
    TokenVerifier,
    issue_token,
    load_public_key,
    load_signing_key,
    public_pem,
)

SECRET = "s" * 40
OTHER_SECRET = "o" * 40
APP_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
NOW = 1_000_000.0

HS = TokenVerifier(secret=SECRET)
ED = TokenVerifier(public_key=APP_KEY.public_key())
BOTH = TokenVerifier(secret=SECRET, public_key=APP_KEY.public_key())


def mint(key, room="room", ttl=60.0, **kw):
    return issue_token(key, room, "alice", ttl=ttl, now=NOW, **kw)


@pytest.mark.parametrize(
    ("verifier", "token", "room", "at", "code"),
    [
        (HS, mint(SECRET), "room", NOW + 10, None),
        (ED, mint(APP_KEY), "room", NOW + 10, None),
        (BOTH, mint(SECRET), "room", NOW + 10, None),
        (BOTH, mint(APP_KEY), "room", NOW + 10, None),
        # signed by another key of the same kind
        (HS, mint(OTHER_SECRET), "room", NOW + 10, "untrusted_token"),
        (ED, mint(OTHER_KEY), "room", NOW + 10, "untrusted_token"),
        (BOTH, mint(OTHER_KEY), "room", NOW + 10, "untrusted_token"),
        # an algorithm the node has no key for (no algorithm confusion)
        (HS, mint(APP_KEY), "room", NOW + 10, "untrusted_token"),
        (ED, mint(SECRET), "room", NOW + 10, "untrusted_token"),
        (ED, "garbage.token.value", "room", NOW, "bad_token"),
        (HS, "", "room", NOW, "bad_token"),
        (ED, mint(APP_KEY), "room", NOW + 61, "token_expired"),
        (HS, mint(SECRET), "other", NOW + 10, "forbidden"),
        (ED, mint(APP_KEY), "other", NOW + 10, "forbidden"),
    ],
)
def test_verify(verifier, token, room, at, code):
    if code is None:
        grant = verifier.verify(token, room, now=at)
        assert grant.identity == "alice" and grant.room == room
        return
    with pytest.raises(TokenError) as info:
        verifier.verify(token, room, now=at)
    assert info.value.code == code


@pytest.mark.parametrize("key", [SECRET, APP_KEY])
@pytest.mark.parametrize(("publish", "subscribe"), [(True, True), (False, True), (True, False)])
def test_grants(key, publish, subscribe):
    grant = BOTH.verify(mint(key, publish=publish, subscribe=subscribe), "room", now=NOW)
    assert (grant.can_publish, grant.can_subscribe) == (publish, subscribe)
    assert grant.expires_at == NOW + 60


@pytest.mark.parametrize(
    ("key", "room", "ttl", "message"),
    [
        ("short", "room", 60, "at least 32"),
        (SECRET, "bad room!", 60, "invalid room name"),
        (SECRET, "", 60, "invalid room name"),
        (SECRET, "x" * 129, 60, "invalid room name"),
        (APP_KEY, "room", -5, "ttl"),
        (APP_KEY, "room", 0, "ttl"),
        (SECRET, "room", 10**9, "ttl"),
    ],
)
def test_issue_refuses(key, room, ttl, message):
    with pytest.raises(ValueError, match=message):
        issue_token(key, room, "alice", ttl=ttl)


def test_key_files_round_trip():
    from cryptography.hazmat.primitives import serialization

    private_pem = APP_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signing = load_signing_key(private_pem)
    public = load_public_key(public_pem(signing).encode())
    token = issue_token(signing, "room", "bob", now=NOW)
    assert TokenVerifier(public_key=public).verify(token, "room", now=NOW).identity == "bob"


@pytest.mark.parametrize(
    ("loader", "data", "message"),
    [
        (load_public_key, b"-----BEGIN PRIVATE KEY-----\n...", "private key"),
        (load_public_key, b"not a key", "not a PEM public key"),
        (load_signing_key, b"not a key", "not a PEM private key"),
    ],
)
def test_bad_key_material(loader, data, message):
    with pytest.raises(KeyMaterialError, match=message):
        loader(data)


def test_verifier_needs_a_key():
    with pytest.raises(ValueError):
        TokenVerifier()
    with pytest.raises(ValueError, match="at least 32"):
        TokenVerifier(secret="short")
