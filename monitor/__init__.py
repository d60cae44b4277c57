"""Cascade monitoring: Prometheus metrics and history on every node, and the overlay
dashboard (``cascade monitor``). Loaded by the CLI through the ``cascade.extensions``
entry point; ``peer/`` never imports this package."""

from monitor.access import AccessRule, startup_refusal
from monitor.extension import MonitorExtension, extension, start_monitor
from monitor.node import NodeMonitor
from monitor.observer import DashboardApp, Observer
from monitor.overview import OverlayView, parse_node_stats

__all__ = [
    "AccessRule",
    "DashboardApp",
    "MonitorExtension",
    "NodeMonitor",
    "Observer",
    "OverlayView",
    "extension",
    "parse_node_stats",
    "start_monitor",
    "startup_refusal",
]
