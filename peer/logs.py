"""Log output of a node's processes: one line per record, plain or JSON."""

from __future__ import annotations

import json
import logging
from typing import Any

THIRD_PARTY_LOGGERS = ("kademlia", "rpcudp", "aioquic", "quic", "aioice", "aiortc", "aiohttp")


class LineFormatter(logging.Formatter):
    """One line per record: tracebacks are folded with `` | ``."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (``time``, ``level``, ``logger``, ``message``, and the
    fields given at construction, e.g. a worker's id)."""

    def __init__(self, **fields: object) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, as_json: bool = False, *, worker: int | None = None) -> None:
    """Root logging at ``level`` on stderr, single-line; third-party libraries at WARNING
    unless ``level`` is DEBUG. Raises ValueError for an unknown level."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"--log-level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(JsonFormatter() if worker is None else JsonFormatter(worker=worker))
    else:
        who = "" if worker is None else f"worker-{worker} "
        handler.setFormatter(LineFormatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))
