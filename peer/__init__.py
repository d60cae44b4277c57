"""Cascade peer: the SFU node (Router, Transports, Producers, Consumers, signaling)."""
