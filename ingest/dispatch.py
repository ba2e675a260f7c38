"""Getting workers onto a run.

- ``RQDispatcher``: enqueues ``workers.jobs.serve_run(run_id)`` on the RQ queue ``singer-ingest``, one
  job per stream up to ``max_workers_per_run``; each job, picked up by a ``rq worker``, owns a share of
  the run's streams. While the run lasts it watches the run's live workers: when fewer are alive or
  queued than the run wants for longer than a lease, it enqueues another job.
- ``EmbeddedDispatcher``: runs the same ``Member`` loop in a thread of the feeder's process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis
from rq import Queue
from rq.job import Job, JobStatus

from . import wire
from .config import ConnectionSettings, FeederSettings
from .errors import IngestError, RunFailed

logger = logging.getLogger(__name__)

JOB_FUNCTION = "workers.jobs.serve_run"
NO_WORKER_WARNING_SECONDS = 30


class RQDispatcher:
    def __init__(self, conn: redis.Redis, run_id: str, settings: FeederSettings, lease_ttl_seconds: float,
                 clock=time.monotonic):
        self.queue = Queue(wire.QUEUE, connection=conn)
        self.conn = conn
        self.run_id = run_id
        self.settings = settings
        self.grace_seconds = 2 * lease_ttl_seconds
        self.clock = clock
        self.job_ids: list[str] = []
        self.wanted = 0
        self._short_since: float | None = None
        self._next_check = 0.0
        self._lonely_since: float | None = None
        self._next_lonely_warning = 0.0

    def _enqueue(self) -> None:
        job_id = f"singer-ingest-{self.run_id}-{len(self.job_ids) + 1}"
        self.queue.enqueue(JOB_FUNCTION, self.run_id, job_id=job_id, job_timeout=self.settings.job_timeout_seconds,
                           result_ttl=self.settings.run_ttl_seconds, failure_ttl=self.settings.run_ttl_seconds,
                           description=f"singer-ingest run {self.run_id}")
        self.job_ids.append(job_id)
        logger.info("run %s: enqueued worker job %s on queue %r", self.run_id, job_id, wire.QUEUE)

    def streams_known(self, n_streams: int) -> None:
        self.wanted = min(n_streams, self.settings.max_workers_per_run)
        while len(self.job_ids) < self.wanted:
            self._enqueue()

    def supervise(self, live_members: int) -> None:
        now = self.clock()
        if now < self._next_check or not self.wanted:
            return
        self._next_check = now + 1.0
        self._warn_if_no_worker(live_members, now)
        statuses = [job.get_status(refresh=False) if job else None
                    for job in Job.fetch_many(self.job_ids, connection=self.conn)]
        queued = sum(1 for s in statuses if s in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED))
        if live_members + queued >= self.wanted or queued >= self.wanted:
            self._short_since = None
            return
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since >= self.grace_seconds:
            logger.warning("run %s: %d worker(s) alive, %d job(s) queued; enqueueing another job",
                           self.run_id, live_members, queued)
            self._enqueue()
            self._short_since = None

    def _warn_if_no_worker(self, live_members: int, now: float) -> None:
        if live_members:
            self._lonely_since = None
            return
        if self._lonely_since is None:
            self._lonely_since = now
        waited = now - self._lonely_since
        if waited >= NO_WORKER_WARNING_SECONDS and now >= self._next_lonely_warning:
            logger.warning("run %s: no worker has been working on this run for %.0f s; is an `rq worker %s` "
                           "running against this Redis?", self.run_id, waited, wire.QUEUE)
            self._next_lonely_warning = now + 60

    def close(self) -> None:
        return None


class EmbeddedDispatcher:
    """The worker loop in a thread of this process (embedded mode: fakeredis and DuckDB)."""

    def __init__(self, conn: redis.Redis, run_id: str, connection: ConnectionSettings):
        self.conn = conn
        self.run_id = run_id
        self.connection = connection
        self.thread: threading.Thread | None = None
        self.member = None
        self.error: BaseException | None = None

    def streams_known(self, n_streams: int) -> None:
        if self.thread is not None or n_streams == 0:
            return
        from workers.runner import Member

        self.member = member = Member(self.conn, self.run_id, f"{socket.gethostname()}:{os.getpid()}:embedded",
                        self.connection, embedded=True)

        def serve() -> None:
            try:
                member.serve()
            except BaseException as exc:  # handed to the feeder's thread, which reports it
                self.error = exc

        self.thread = threading.Thread(target=serve, name="singer-ingest-worker", daemon=True)
        self.thread.start()

    def supervise(self, live_members: int) -> None:
        if self.thread is not None and not self.thread.is_alive() and self.error is not None:
            if isinstance(self.error, IngestError):
                raise self.error
            raise RunFailed(f"the embedded worker stopped: {type(self.error).__name__}: {self.error}") from self.error

    def close(self) -> None:
        if self.thread is not None:
            self.member.stop()
            self.thread.join(timeout=30)
