"""Cascade relay: QUIC pipes that carry producers between nodes."""
