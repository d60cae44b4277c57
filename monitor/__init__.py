"""Cascade monitor: CPU and stream stats, Prometheus metrics, overlay dashboard."""
