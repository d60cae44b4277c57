"""Scale-out / scale-in signal: capacity tables and hysteresis, no clock, no network."""

from __future__ import annotations

import pytest

from peer.placement import NodeView
from peer.scaling import ScalePolicy, ScaleSignal, Signal, is_region_leader, region_capacity


def n(node_id: str, region: str, headroom: float, capacity: int = 100, **kw: object) -> NodeView:
    return NodeView(node_id, region, f"http://{node_id}", headroom, capacity, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "nodes", "spilled", "region", "capacity", "used", "removable"),
    [
        ("one idle node", [n("a", "eu", 1.0)], {}, "eu", 100, 0, None),
        ("two half-used nodes", [n("a", "eu", 0.5), n("b", "eu", 0.5)], {}, "eu", 200, 100, None),
        (
            "two light nodes: one can go",
            [n("a", "eu", 0.9), n("b", "eu", 0.8)],
            {},
            "eu",
            200,
            30,
            "a",
        ),
        (
            "draining nodes do not count",
            [n("a", "eu", 0.9, draining=True), n("b", "eu", 0.5)],
            {},
            "eu",
            100,
            50,
            None,
        ),
        (
            "unknown capacity counts one unit",
            [n("a", "us", 0.25, capacity=0)],
            {},
            "us",
            1,
            0.75,
            None,
        ),
        ("a region with spills but no node", [n("a", "eu", 0.9)], {"ap": 3}, "ap", 0, 0, None),
    ],
)
def test_region_capacity(name, nodes, spilled, region, capacity, used, removable):
    cap = region_capacity(nodes, spilled)[region]
    assert (cap.capacity, round(cap.used, 6), cap.removable) == (capacity, used, removable), name


def test_only_the_lowest_node_id_of_a_region_reports():
    nodes = [n("b", "eu", 0.5), n("a", "eu", 0.5), n("c", "us", 0.5)]
    assert [x.node_id for x in nodes if is_region_leader(x.node_id, x.region, nodes)] == ["a", "c"]


def run(signal: ScaleSignal, steps: list[tuple[float, list[NodeView], dict[str, int]]]):
    out = []
    for now, nodes, spilled in steps:
        for change in signal.update(region_capacity(nodes, spilled), now):
            out.append((now, change.region, change.signal))
    return out


def test_scale_out_raised_at_once_and_cleared_after_hold_above_the_band():
    sig = ScaleSignal(ScalePolicy(scale_out_below=0.2, scale_out_clear_above=0.35, hold=30))
    full = [n("a", "eu", 0.1), n("b", "eu", 0.15)]
    band = [n("a", "eu", 0.3), n("b", "eu", 0.3)]  # free 30 %: inside the band
    clear = [n("a", "eu", 0.5), n("b", "eu", 0.5), n("c", "eu", 0.5)]
    changes = run(
        sig,
        [
            (0, band, {}),
            (1, full, {}),  # raised at once
            (2, full, {}),
            (10, band, {}),  # in the band: stays
            (50, band, {}),
            (60, clear, {}),  # clearly above: starts the hold
            (70, full, {}),  # flaps back: hold restarts
            (71, clear, {}),
            (95, clear, {}),
            (101, clear, {}),  # held 30 s
        ],
    )
    assert changes == [(1, "eu", Signal.SCALE_OUT), (101, "eu", Signal.STEADY)]


def test_a_spill_raises_scale_out_even_with_free_capacity():
    sig = ScaleSignal()
    changes = run(sig, [(0, [n("a", "ap", 0.6)], {"ap": 1})])
    assert changes == [(0, "ap", Signal.SCALE_OUT)]


def test_scale_in_only_after_the_condition_holds():
    sig = ScaleSignal(ScalePolicy(hold=60))
    light = [n("a", "us", 0.95), n("b", "us", 0.9)]
    busy = [n("a", "us", 0.4), n("b", "us", 0.5)]
    changes = run(
        sig, [(0, light, {}), (30, light, {}), (40, busy, {}), (50, light, {}), (110, light, {})]
    )
    assert changes == [(110, "us", Signal.SCALE_IN)]


def test_notifications_are_signed_and_checked():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peer.scaling import sign_notification, verify_notification

    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    body = b'{"signal": "scale_out"}'
    headers = sign_notification(body, key)
    assert verify_notification(body, headers, public)
    assert not verify_notification(body + b" ", headers, public)
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert not verify_notification(body, headers, other)
    assert not verify_notification(body, {**headers, "X-Cascade-Signature": "zz"}, public)


def test_webhook_outbox_retries_with_backoff_then_gives_up():
    from peer.scaling import WebhookOutbox

    box = WebhookOutbox(first_retry=1.0, max_retry=4.0, max_attempts=4)
    box.add(b"a", now=0.0)
    assert box.due(0.0) == [b"a"]
    times = []
    now = 0.0
    while len(box):
        (body,) = box.due(now)
        times.append(now)
        box.done(body, ok=False, now=now)
        now = box.deadline() or now
    assert times == [0.0, 1.0, 3.0, 7.0] and box.dropped == 1
    box.add(b"b", now=10.0)
    box.done(b"b", ok=True, now=10.0)
    assert len(box) == 0 and box.deadline() is None
