"""Structured logging for the gateway and the relay: ``key=value`` text or one JSON
object per line, quiet at INFO.

Fields go in ``extra={...}``. A noisy source (a mapper publishing garbage) is limited by
:class:`RateLimit` so that one bad client cannot flood the journal.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["RateLimit", "setup"]


class RateLimit:
    """Allows ``burst`` events per key every ``per_s`` seconds, counting the rest."""

    def __init__(self, burst: int = 10, per_s: float = 60.0) -> None:
        self.burst, self.per_s = burst, per_s
        self._windows: dict[str, tuple[float, int]] = {}
        self.suppressed = 0

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.per_s:
            start, count = now, 0
        self._windows[key] = (start, count + 1)
        if count < self.burst:
            return True
        self.suppressed += 1
        return False


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        base = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extra = " ".join(
            f"{k}={json.dumps(v, default=str) if isinstance(v, str) and ' ' in v else v}"
            for k, v in _fields(record).items()
        )
        text = f"{base} {extra}" if extra else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter stays out of INFO.
    for name in ("amqtt", "transitions", "mqtt", "aiomqtt", "paho", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
