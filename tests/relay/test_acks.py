"""When a relay receiver ACKs: prompt at the start and after a loss, thinned otherwise."""

from __future__ import annotations

import pytest

from relay.acks import MAX_ACK_DELAY, AckPolicy, AckSettings

SMALL = AckSettings(every=16, delay=0.010, prompt_packets=4, prompt_after_gap=3)


def feed(policy: AckPolicy, numbers: list[int], largest: int = -1) -> int:
    for n in numbers:
        policy.packet(n, largest)
        largest = max(largest, n)
    return largest


def test_prompt_for_the_first_packets_then_thinned() -> None:
    policy = AckPolicy(SMALL)
    assert policy.prompt and policy.delay == 0.001
    largest = feed(policy, [10, 11])
    assert policy.end_of_read(2)  # a read of 2 is ACKed at once
    assert not policy.end_of_read(1)  # a single packet waits the prompt delay
    policy.acked()
    feed(policy, [12, 13], largest)
    assert not policy.prompt and policy.delay == 0.010
    # thinned: a read is ACKed at once only when 16 packets wait
    assert not policy.end_of_read(2)
    assert not policy.end_of_read(15)
    assert policy.end_of_read(16)
    assert not policy.end_of_read(0)


@pytest.mark.parametrize(
    ("numbers", "what"),
    [([20, 21, 23], "a missing packet"), ([20, 21, 23, 22], "a late packet")],
)
def test_a_gap_is_acked_at_the_end_of_its_read_and_turns_prompt_acks_back_on(
    numbers: list[int], what: str
) -> None:
    policy = AckPolicy(SMALL)
    largest = feed(policy, list(range(10, 20)))
    policy.acked()
    assert not policy.prompt
    largest = feed(policy, numbers, largest)
    assert policy.gaps >= 1, what
    assert policy.end_of_read(1)
    policy.acked()
    assert policy.prompt  # the sender may be recovering: prompt for a while
    assert not policy.end_of_read(1)  # the gap was ACKed
    feed(policy, [largest + 1, largest + 2, largest + 3], largest)
    assert not policy.prompt


def test_in_order_packets_are_no_gap() -> None:
    policy = AckPolicy(SMALL)
    feed(policy, list(range(5, 500)))
    assert policy.gaps == 0
    assert not policy.prompt


def test_thinning_off_acks_every_read_of_two() -> None:
    policy = AckPolicy(AckSettings(every=0))
    feed(policy, list(range(1000)))
    assert policy.prompt and policy.delay == 0.001
    assert policy.end_of_read(2) and not policy.end_of_read(1)


def test_timer_only() -> None:
    policy = AckPolicy(AckSettings(ack_after=0, every=0))
    feed(policy, list(range(100)))
    assert not policy.end_of_read(50)


@pytest.mark.parametrize(
    "settings",
    [
        {"delay": MAX_ACK_DELAY + 0.001},
        {"prompt_delay": -0.001},
        {"every": -1},
        {"prompt_packets": -5},
    ],
)
def test_settings_out_of_range_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AckSettings(**settings)  # type: ignore[arg-type]
