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

from ingest.config import load_worker_connection

from .runner import Member

logger = logging.getLogger(__name__)


def _setup_logging() -> None:
    """RQ configures only its own logger; give the product's loggers the same stderr at INFO."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = os.environ.get("SINGER_INGEST_LOG_LEVEL", "INFO").upper()
    for name in ("ingest", "workers", "sinks"):
        log = logging.getLogger(name)
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(fmt)
            log.addHandler(handler)
            log.setLevel(level)
            log.propagate = False


def serve_run(run_id: str) -> str:
    """Work on run ``run_id`` until it is done: own a share of its streams, load them, commit STATE."""
    _setup_logging()
    job = get_current_job()
    if job is None:
        raise RuntimeError("serve_run runs inside an RQ worker (rq worker singer-ingest)")
    member_id = f"{socket.gethostname()}:{os.getpid()}:{job.id}"
    Member(job.connection, run_id, member_id, load_worker_connection()).serve()
    return f"run {run_id}: worker {member_id} done"
