"""Capacity search: the Cascade users of locustfile.py under a step-load shape.

    taskset -c 0 cascade node --dev --port 8080 --max-cpu 100 &
    taskset -c 1 locust -f loadtests/capacity.py --headless --host http://127.0.0.1:8080 \\
        --step-spawn-rate 5 --step-users 5 --step-seconds 30 --step-max-users 200

Adds ``--step-users`` participants every ``--step-seconds`` until a step breaks the
quality target (first frame p95, loss, video fps, any ``overloaded`` refusal), then
stops and reports the last step that held: participants, the nodes' consumers
(tracks forwarded), forwarded packets/s, node CPU and the load generator's own CPU.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from locust import LoadTestShape  # noqa: E402

from loadtests.locustfile import COLLECTOR, CascadeParticipant  # noqa: E402
from loadtests.scenario import CapacitySearch, QualityTarget  # noqa: E402

__all__ = ["CascadeParticipant", "StepLoadShape"]


class StepLoadShape(LoadTestShape):
    """Step load until the quality target breaks (see :class:`CapacitySearch`)."""

    search: CapacitySearch | None = None
    _wall_offset = 0.0  # wall clock minus locust's run time

    def _options(self) -> Any:
        assert self.runner is not None and self.runner.environment.parsed_options is not None
        return self.runner.environment.parsed_options

    def _make_search(self) -> CapacitySearch:
        o = self._options()
        return CapacitySearch(
            step_users=o.step_users,
            step_seconds=o.step_seconds,
            max_users=o.step_max_users,
            retries=o.step_retries,
            target=QualityTarget(
                first_frame_p95_ms=o.target_first_frame_ms,
                max_loss=o.target_loss,
                min_fps=o.target_fps,
            ),
        )

    def tick(self) -> tuple[int, float] | None:
        if self.search is None:
            self.search = self._make_search()
        search = self.search
        now = self.get_run_time()
        self._wall_offset = time.time() - now
        search.add(now, COLLECTOR.take_quality())
        since = self._wall_offset + (search.step_started or 0.0) + search.settle
        users = search.tick(
            now, COLLECTOR.server.summary(since), COLLECTOR.generator.summary(since)
        )
        if users is None:
            COLLECTOR.capacity = search.result()
            print("\ncapacity search: " + json.dumps(COLLECTOR.capacity["last_held"]), flush=True)
            return None
        return users, float(self._options().step_spawn_rate)
