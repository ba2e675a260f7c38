"""Log output of the feeder and the workers: readable lines, or one JSON object a line for log shippers.

The feeder takes ``--log-level`` and ``--log-format``; workers take ``SINGER_INGEST_LOG_LEVEL`` and
``SINGER_INGEST_LOG_FORMAT`` from their environment. Either way logs go to stderr; stdout is STATE only.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                             rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                             json_ensure_ascii=False)
    return logging.Formatter(TEXT_FORMAT)


def handler(fmt: str, stream=None) -> logging.Handler:
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(formatter(fmt))
    return h


def configure(names: tuple[str, ...], level: str, fmt: str, log_handler: logging.Handler | None = None) -> None:
    """Give the product's loggers one stderr handler in the chosen format (leaving other loggers alone)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    h = log_handler or handler(fmt)
    for name in names:
        log = logging.getLogger(name)
        for old in list(log.handlers):
            log.removeHandler(old)
        log.addHandler(h)
        log.setLevel(level.upper())
        log.propagate = False
