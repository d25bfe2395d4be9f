"""Logging for node processes: human lines by default, JSON lines for collectors.

In JSON mode every line on stderr is one object: `ts`, `level`, `logger`, `msg`, plus
any structured fields a call passes with `extra=` (the round driver adds `event`,
`round`, `attempt`, `term`, `stage`, `seconds`), so a collector can filter on them
without parsing messages. Python warnings and uncaught exceptions go through the
same formatter, so nothing else lands on the stream.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from types import TracebackType
from typing import Any

_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}
_CORE_KEYS = ("ts", "level", "logger", "msg", "exc", "thread")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; extra fields are kept, core keys never overwritten."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in _CORE_KEYS and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str)


def _log_uncaught(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None, thread: str | None = None) -> None:
    where = f" in thread {thread}" if thread else ""
    logging.getLogger("uncaught").critical("uncaught exception%s", where,
                                           exc_info=(exc_type, exc, tb))


def setup_logging(level: str = "info", json_lines: bool = False) -> None:
    """Send every log record (and, in JSON mode, warnings and uncaught errors) to stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)
    if json_lines:
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):
        return  # as the default hook: a thread's SystemExit is silent
    _log_uncaught(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback,
                  args.thread.name if args.thread else None)
