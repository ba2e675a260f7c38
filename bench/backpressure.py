#!/usr/bin/env python3
"""Bounded memory under a slow sink: Redis memory while feeding millions of records.

Feeds `gen_singer.py --records N` straight from the generator through `singer-ingest --redis-url` to one
`rq worker` loading into PostgreSQL, where every commit is slowed down by a trigger (pg_sleep) on the
offsets table, so the feeder runs far ahead of the sink and must wait. Samples Redis `used_memory`
every 0.1 s and the feeder's peak RSS.

    python bench/backpressure.py --records 2000000 --max-backlog-mb 64

Prints the bound, the baseline and peak Redis memory, the peak above baseline as a ratio of the bound,
and the feeder's and worker's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import hwm_kb, tree_peak_kb  # noqa: E402

BIN = Path(sys.executable).parent
GEN = ROOT.parent / "shared" / "bench" / "gen_singer.py"
PG_DSN = os.environ.get("BENCH_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2_000_000)
    ap.add_argument("--max-backlog-mb", type=int, default=64)
    ap.add_argument("--commit-delay", type=float, default=0.5, help="seconds each commit is slowed down by")
    args = ap.parse_args()
    bound = args.max_backlog_mb * 1024 * 1024
    schema = f"bp_{uuid.uuid4().hex[:8]}"
    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    pg = psycopg2.connect(PG_DSN)
    pg.autocommit = True
    with pg.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
        cur.execute(f'CREATE TABLE "{schema}"._singer_ingest_offsets (run_id text NOT NULL, stream text NOT NULL, '
                    f'seq bigint NOT NULL, fence bigint NOT NULL, updated_at timestamptz NOT NULL, '
                    f'PRIMARY KEY (run_id, stream))')
        cur.execute(f'CREATE FUNCTION "{schema}".slow() RETURNS trigger LANGUAGE plpgsql AS '
                    f'$$ BEGIN PERFORM pg_sleep({args.commit_delay}); RETURN NULL; END $$')
        cur.execute(f'CREATE TRIGGER slow AFTER UPDATE ON "{schema}"._singer_ingest_offsets '
                    f'FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".slow()')
    tmp = Path(tempfile.mkdtemp(prefix="singer-ingest-bp-"))
    (tmp / "t.json").write_text(json.dumps({"destination": "postgres", "default_target_schema": schema,
                                            "max_backlog_bytes": bound}))
    env = {**os.environ, "SINGER_INGEST_POSTGRES_DSN": PG_DSN}
    worker = subprocess.Popen([str(BIN / "rq"), "worker", "singer-ingest", "--url", REDIS_URL],
                              stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    baseline = conn.info("memory")["used_memory"]
    peak = baseline
    worker_peak = 0
    gen = subprocess.Popen([sys.executable, str(GEN), "--records", str(args.records)], stdout=subprocess.PIPE)
    start = time.monotonic()
    feeder = subprocess.Popen([str(BIN / "singer-ingest"), "--config", str(tmp / "t.json"), "--redis-url", REDIS_URL],
                              stdin=gen.stdout, stdout=subprocess.DEVNULL, stderr=open(tmp / "feeder.log", "wb"))
    gen.stdout.close()
    feeder_peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, feeder_peak, worker_peak
        while not stop.wait(0.1):
            peak = max(peak, conn.info("memory")["used_memory"])
            feeder_peak = max(feeder_peak, hwm_kb(feeder.pid))
            worker_peak = max(worker_peak, tree_peak_kb(worker.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    rc = feeder.wait()
    seconds = time.monotonic() - start
    stop.set()
    sampler.join()
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)
    with pg.cursor() as cur:
        cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
    mb = 1024 * 1024
    print(f"records {args.records}, feeder exit {rc}, {seconds:.0f} s ({args.records / seconds:,.0f} records/s), "
          f"commits slowed by {args.commit_delay} s")
    print(f"max_backlog_bytes {bound / mb:.0f} MB; Redis used_memory baseline {baseline / mb:.1f} MB, "
          f"peak {peak / mb:.1f} MB, peak above baseline {(peak - baseline) / mb:.1f} MB = "
          f"{(peak - baseline) / bound:.2f} x the bound")
    print(f"peak RSS: feeder {feeder_peak / 1024:.0f} MB, worker (largest process) {worker_peak / 1024:.0f} MB "
          f"(logs: {tmp})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
