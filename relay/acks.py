"""When the receiving end of a relay connection sends QUIC ACKs (sans-I/O).

A relay flow is a steady stream of DATAGRAM packets that QUIC never retransmits; its ACKs
only feed the sender's loss detection and congestion window. Each ACK costs the receiver a
packet and the sender a wake-up, so in the steady state :class:`AckPolicy` thins them to one
per ``every`` packets or ``delay`` seconds, whichever comes first, as QUIC stacks do once a
connection is past its start (RFC 9000 13.2.2 allows it; the delay stays under the 25 ms
``max_ack_delay`` the connection advertises).

ACKs stay prompt (the end of each read of ``ack_after`` or more packets, else after
``prompt_delay``) while the sender's window may be small: the first ``prompt_packets``
packets, and ``prompt_after_gap`` packets after a gap or a reordering, when the sender is
recovering from a loss. The read that shows a gap or a reordering is ACKed at once
(RFC 9000 13.2.1), so losses are declared as fast as without thinning.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_ACK_DELAY", "AckPolicy", "AckSettings"]

#: The ``max_ack_delay`` aioquic advertises: no ACK may wait longer.
MAX_ACK_DELAY = 0.025


@dataclass(frozen=True)
class AckSettings:
    """How a receiver ACKs; see :class:`AckPolicy`. ``every`` 0: never thinned."""

    ack_after: int = 2
    prompt_delay: float = 0.001
    every: int = 16
    delay: float = 0.010
    prompt_packets: int = 256
    prompt_after_gap: int = 128

    def __post_init__(self) -> None:
        for name in ("prompt_delay", "delay"):
            if not 0.0 <= getattr(self, name) <= MAX_ACK_DELAY:
                raise ValueError(f"{name} must be within 0..{MAX_ACK_DELAY} s")
        if min(self.ack_after, self.every, self.prompt_packets, self.prompt_after_gap) < 0:
            raise ValueError("packet counts must not be negative")


class AckPolicy:
    """Decides, per received packet and per read of the socket, when to ACK.

    Call :meth:`packet` for each ack-eliciting packet (with the largest packet number
    received before it, -1 if none), :meth:`end_of_read` with the count of
    packets not yet ACKed when a read of the socket is done, and :meth:`acked` when an
    ACK has been built. :attr:`delay` is how long the ACK of a packet may wait now.
    """

    def __init__(self, settings: AckSettings | None = None) -> None:
        self.settings = s = settings or AckSettings()
        self._prompt_left = s.prompt_packets if s.every else -1
        self._gap = False
        #: gaps and reorderings seen (each turned prompt ACKs back on)
        self.gaps = 0

    @property
    def prompt(self) -> bool:
        """True while ACKs are prompt (start, after a gap, or thinning off)."""
        return self._prompt_left != 0

    @property
    def delay(self) -> float:
        """How long an ACK may wait after the first packet it acknowledges."""
        s = self.settings
        return s.prompt_delay if self.prompt else s.delay

    def packet(self, number: int, largest: int) -> None:
        """An ack-eliciting packet ``number`` arrived; ``largest`` had been received."""
        if largest >= 0 and number != largest + 1:
            self._gap = True
            self.gaps += 1
            if self.settings.every:
                self._prompt_left = max(self._prompt_left, self.settings.prompt_after_gap)
        if self._prompt_left > 0:
            self._prompt_left -= 1

    def end_of_read(self, unacked: int) -> bool:
        """Whether to ACK now, a read of the socket having left ``unacked`` packets."""
        if not unacked:
            return False
        if self._gap:
            return True
        s = self.settings
        if self.prompt:
            return bool(s.ack_after) and unacked >= s.ack_after
        return unacked >= s.every

    def acked(self) -> None:
        """An ACK covering everything received so far was built."""
        self._gap = False
