"""Unit tests: node certificates and signatures; the impairment proxy's decision core."""

from __future__ import annotations

import itertools

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import RelaySource, RemoteProducer, auth, make_certificate, public_key_bytes
from tests.impairment import Impairment
from tests.relay.test_flows import make_rp


def test_certificate_carries_node_key() -> None:
    key = Ed25519PrivateKey.generate()
    cert = make_certificate(key)
    assert auth.certificate_key(cert) == public_key_bytes(key)
    assert len(public_key_bytes(key)) == 32
    cert.verify_directly_issued_by(cert)  # self-signed with the node key


def test_transcript_signatures_are_role_and_key_bound() -> None:
    c, s = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ck, sk = public_key_bytes(c), public_key_bytes(s)
    n1, n2 = b"a" * 32, b"b" * 32
    data = auth.transcript(b"client", ck, sk, n1, n2)
    sig = auth.sign_transcript(c, data)
    assert auth.verify_transcript(ck, sig, data)
    assert not auth.verify_transcript(sk, sig, data)  # wrong key
    assert not auth.verify_transcript(ck, sig, auth.transcript(b"server", ck, sk, n1, n2))
    other = public_key_bytes(Ed25519PrivateKey.generate())
    assert not auth.verify_transcript(ck, sig, auth.transcript(b"client", ck, other, n1, n2))
    assert not auth.verify_transcript(ck, sig, auth.transcript(b"client", ck, sk, n1, b"c" * 32))
    assert not auth.verify_transcript(b"short", sig, data)


def test_remote_producer_satisfies_relay_source() -> None:
    rp, _ = make_rp()
    src: RelaySource = rp  # checked by mypy: a remote producer can be relayed again
    assert isinstance(src, RemoteProducer)


def test_impairment_is_seeded_and_deterministic() -> None:
    def run(seed: int) -> list[float | None]:
        imp = Impairment(delay=0.01, jitter=0.005, loss=0.1, seed=seed)
        return [imp.decide(i * 0.001, 100) for i in range(500)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_impairment_loss_rate_delay_and_order() -> None:
    imp = Impairment(delay=0.04, jitter=0.01, loss=0.02, seed=7)
    out = [imp.decide(i * 0.001, 100) for i in range(20000)]
    kept = [t for t in out if t is not None]
    assert 0.01 < imp.dropped / 20000 < 0.03
    assert all(b > a for a, b in itertools.pairwise(kept))  # order preserved
    assert all(t - i * 0.001 >= 0.04 for i, t in enumerate(out) if t is not None)
    assert imp.bytes_passed == 100 * len(kept)


def test_impairment_blocked_drops_everything() -> None:
    imp = Impairment(blocked=True)
    assert all(imp.decide(0.0, 10) is None for _ in range(10))
    imp.blocked = False
    assert imp.decide(0.0, 10) == 0.0
