"""RQ job functions. Run them with the RQ CLI as shipped::

    rq worker singer-ingest --url redis://host:6379/0

Jobs carry only the run id; the worker takes its destination credentials from its own environment
(``SINGER_INGEST_CONFIG`` naming a config file, and ``SINGER_INGEST_*`` variables), never from Redis.
"""

from __future__ import annotations

import logging
import os
import socket

from rq import get_current_job

from ingest import logs
from ingest.config import load_worker_connection
from ingest.process import limit_malloc_arenas, shorten_switch_interval, tune_gc

from .runner import Member

logger = logging.getLogger(__name__)


def _setup_logging() -> None:
    """RQ configures only its own logger; give the product's loggers stderr too, at INFO unless
    SINGER_INGEST_LOG_LEVEL says otherwise, as text or JSON lines (SINGER_INGEST_LOG_FORMAT=json)."""
    level = os.environ.get("SINGER_INGEST_LOG_LEVEL", "INFO")
    fmt = os.environ.get("SINGER_INGEST_LOG_FORMAT", "text").lower()
    if fmt not in logs.FORMATS:
        logger.warning("SINGER_INGEST_LOG_FORMAT must be one of %s, got %r; using text", ", ".join(logs.FORMATS), fmt)
        fmt = "text"
    logs.configure(("ingest", "workers", "sinks"), level, fmt)


def serve_run(run_id: str) -> str:
    """Work on run ``run_id`` until it is done: own a share of its streams, load them, commit STATE."""
    _setup_logging()
    limit_malloc_arenas()
    tune_gc()
    shorten_switch_interval()
    job = get_current_job()
    if job is None:
        raise RuntimeError("serve_run runs inside an RQ worker (rq worker singer-ingest)")
    member_id = f"{socket.gethostname()}:{os.getpid()}:{job.id}"
    Member(job.connection, run_id, member_id, load_worker_connection()).serve()
    return f"run {run_id}: worker {member_id} done"
