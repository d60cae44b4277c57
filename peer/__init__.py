"""Cascade peer: the SFU node (Router, Transports, Producers, Consumers, signaling)."""

from peer import native as _native

# Before any module of the forwarding core is imported: compiled, or all sources.
_native.select()
