"""Prometheus metrics of a worker process, served when the worker's ``metrics_port`` is set.

The metrics live in prometheus-client's default registry; recording them costs a lock and an add, so
they are recorded whether or not a port is open. An RQ worker runs each job in a forked work horse,
so the port is opened by the job (one run at a time per worker process) and closes when it ends.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

ROWS_LOADED = Counter("singer_ingest_rows_loaded", "Rows committed to the destination.", ["run", "stream"])
DEAD_LETTERS = Counter("singer_ingest_dead_letters",
                       "Records committed to the dead-letter table (bad_records=dead_letter).", ["run", "stream"])
BYTES_LOADED = Counter("singer_ingest_bytes_loaded", "Bytes of input (JSON lines) whose rows were committed.",
                       ["run", "stream"])
DRAIN_SECONDS = Histogram("singer_ingest_batch_drain_seconds",
                          "Time to write one batch and its offset in one destination transaction.", ["stream"],
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
BACKLOG_BYTES = Gauge("singer_ingest_backlog_bytes",
                      "Input bytes of the run sent to Redis and not yet acknowledged.", ["run"])
STREAM_ENTRIES = Gauge("singer_ingest_stream_entries",
                       "Entries (chunks of messages) in Redis for a stream this worker owns.", ["run", "stream"])
STREAMS_OWNED = Gauge("singer_ingest_streams_owned", "Streams this worker holds a lease on.", ["run"])
CLAIMS = Counter("singer_ingest_stream_claims",
                 "Streams this worker took: kind=new (nobody had loaded it) or takeover (another worker had).",
                 ["run", "stream", "kind"])
LEASES_LOST = Counter("singer_ingest_leases_lost", "Leases that expired or were taken before renewal.",
                      ["run", "stream"])
FENCED = Counter("singer_ingest_commits_fenced", "Commits refused because another worker took the stream over.",
                 ["run", "stream"])
RETRIES = Counter("singer_ingest_destination_retries",
                  "Transient destination errors retried (stream empty for work not tied to one stream).", ["stream"])
ERRORS = Counter("singer_ingest_errors", "Errors that failed a run in this worker, by kind.", ["kind"])


def forget_stream(run: str, stream: str) -> None:
    """Drop the gauges of a stream this worker no longer owns."""
    try:
        STREAM_ENTRIES.remove(run, stream)
    except KeyError:
        pass  # never set: the stream left before a housekeeping pass measured it


_server_lock = threading.Lock()
_server_port: int | None = None


def serve(port: int | None, address: str) -> int | None:
    """Open the metrics port once per process; return the port serving, or None when off or refused."""
    global _server_port
    if port is None:
        return None
    with _server_lock:
        if _server_port is None:
            try:
                start_http_server(port, addr=address)
            except OSError as exc:
                logger.warning("metrics: cannot listen on %s:%d (%s); this worker runs without metrics. Give each "
                               "worker process on a host its own SINGER_INGEST_METRICS_PORT", address, port,
                               exc.strerror or exc)
                return None
            _server_port = port
            logger.info("metrics: serving Prometheus metrics on http://%s:%d/metrics", address, port)
        return _server_port
