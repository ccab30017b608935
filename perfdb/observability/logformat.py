"""Log line formats: text for people, JSON (one object per line) for log collectors."""

from __future__ import annotations

import datetime
import logging

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes a log call may attach with extra={...}; JsonLogFormatter gives each its own key.
CONTEXT_KEYS = ("peer", "op")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record with stable keys: time (RFC 3339, UTC), level, logger, message,
    then peer and op when the call named them, and exception when one is attached.

    Only the formatted message goes out, never the raw arguments or other attributes, so a log
    line says exactly what the text format would.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry).decode()


def log_formatter(log_format: str) -> logging.Formatter:
    """The formatter for a --log-format choice."""
    if log_format == "json":
        return JsonLogFormatter()
    return logging.Formatter(TEXT_FORMAT)
