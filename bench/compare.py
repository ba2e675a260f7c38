#!/usr/bin/env python3
"""Side by side on one input: singer-ingest against the Singer Postgres targets and a bare COPY.

    python bench/compare.py --records 1000000

Measures, on the same gen_singer.py output and the same PostgreSQL server (validation on everywhere):
- singer-ingest embedded (DuckDB), and distributed into PostgreSQL with 1 and 2 `rq worker` processes;
- pipelinewise-target-postgres 2.1.2 and meltanolabs-target-postgres 0.8.1, each installed by this script
  into its own virtualenv under .cache/bench-venvs/;
- a bare COPY of the rows pre-converted to COPY text (parsing excluded): the floor of what loading costs.
Prints records/s, the ratio of singer-ingest (distributed, 1 worker) to each, peak RSS of every process,
peak Redis memory, and checks every tool loaded the same row counts.
"""

from __future__ import annotations

import argparse
import io
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

import orjson
import psycopg2
import redis
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import tree_peak_kb  # noqa: E402
from sinks import base  # noqa: E402
from sinks.postgres import TYPES, copy_text  # noqa: E402

BIN = Path(sys.executable).parent
GEN = ROOT.parent / "shared" / "bench" / "gen_singer.py"
VENVS = ROOT / ".cache" / "bench-venvs"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "password": "unused-with-trust-auth", "dbname": "test"}
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
OTHERS = {"pipelinewise": ("pipelinewise-target-postgres==2.1.2", "target-postgres"),
          "meltanolabs": ("meltanolabs-target-postgres==0.8.1", "target-postgres")}


def venv(name: str) -> Path:
    spec, exe = OTHERS[name]
    path = VENVS / name
    if not (path / "bin" / exe).exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", spec], check=True)
    return path / "bin" / exe


class Sampler:
    """Peak RSS per watched process tree and peak Redis memory, sampled every 0.2 s."""

    def __init__(self, conn: redis.Redis | None = None):
        self.conn = conn
        self.trees: dict[str, int] = {}
        self.peaks: dict[str, int] = {}
        self.redis_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, label: str, pid: int) -> None:
        self.trees[label] = pid

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for label, pid in list(self.trees.items()):
                kb = tree_peak_kb(pid)
                self.peaks[label] = max(self.peaks.get(label, 0), kb)
            if self.conn is not None:
                self.redis_peak = max(self.redis_peak, self.conn.info("memory")["used_memory"])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def counts(schema: str, tables: list[str]) -> dict[str, int]:
    out = {}
    with psycopg2.connect(PG_DSN) as con, con.cursor() as cur:
        for t in tables:
            cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(t)))
            out[t] = cur.fetchone()[0]
    con.close()
    return out


def drop(schema: str) -> None:
    con = psycopg2.connect(PG_DSN)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    con.close()


def timed(cmd: list[str], stdin_path: Path, env: dict | None = None, sampler: Sampler | None = None,
          label: str = "") -> tuple[float, int, str]:
    start = time.monotonic()
    with open(stdin_path, "rb") as fh:
        proc = subprocess.Popen(cmd, stdin=fh, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if sampler is not None:
            sampler.watch(label, proc.pid)
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.decode()[-2000:]}")
    return time.monotonic() - start, proc.returncode, err.decode()


def start_workers(workers: int, schema: str, tmp: Path) -> tuple[list[subprocess.Popen], dict]:
    """An empty Redis database, a feeder config loading into ``schema``, and ``workers`` rq workers started;
    returns them and the environment the feeder runs with."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    (tmp / "si.json").write_text(json.dumps({"destination": "postgres", "default_target_schema": schema}))
    env = {**os.environ, "SINGER_INGEST_POSTGRES_DSN": PG_DSN}
    procs = [subprocess.Popen([str(BIN / "rq"), "worker", "singer-ingest", "--url", REDIS_URL],
                              stdout=open(tmp / f"worker{i}.log", "wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True) for i in range(workers)]
    time.sleep(1.5)
    return procs, env


def run_singer_ingest_distributed(data: Path, workers: int, tmp: Path) -> dict:
    schema = f"bench_si{workers}_{uuid.uuid4().hex[:6]}"
    conn = redis.Redis.from_url(REDIS_URL)
    procs, env = start_workers(workers, schema, tmp)
    try:
        with Sampler(conn) as sampler:
            for i, p in enumerate(procs):
                sampler.watch(f"worker {i + 1}", p.pid)
            seconds, _, _ = timed([str(BIN / "singer-ingest"), "--config", str(tmp / "si.json"), "--redis-url",
                                   REDIS_URL], data, env, sampler, "feeder")
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
    return {"seconds": seconds, "schema": schema, "rss": sampler.peaks, "redis_peak": sampler.redis_peak}


def run_singer_ingest_embedded(data: Path, tmp: Path) -> dict:
    (tmp / "emb.json").write_text(json.dumps({"duckdb_path": str(tmp / "bench.duckdb")}))
    with Sampler() as sampler:
        seconds, _, _ = timed([str(BIN / "singer-ingest"), "--config", str(tmp / "emb.json")], data, None, sampler,
                              "singer-ingest")
    return {"seconds": seconds, "rss": sampler.peaks}


def run_other(name: str, data: Path, tmp: Path) -> dict:
    exe = venv(name)
    schema = f"bench_{name[:4]}_{uuid.uuid4().hex[:6]}"
    if name == "pipelinewise":
        config = {**PG, "default_target_schema": schema, "validate_records": True, "batch_size_rows": 100000,
                  "primary_key_required": False}
    else:
        config = {"host": PG["host"], "port": PG["port"], "user": PG["user"], "password": PG["password"],
                  "database": PG["dbname"], "default_target_schema": schema, "validate_records": True}
    (tmp / f"{name}.json").write_text(json.dumps(config))
    with Sampler() as sampler:
        seconds, _, _ = timed([str(exe), "--config", str(tmp / f"{name}.json")], data, None, sampler, name)
    return {"seconds": seconds, "schema": schema, "rss": sampler.peaks}


def run_bare_copy(data: Path) -> dict:
    """COPY of rows already converted to COPY text: no JSON parsing, no validation."""
    schema = f"bench_copy_{uuid.uuid4().hex[:6]}"
    specs: dict[str, base.TableSpec] = {}
    rows: dict[str, list[dict]] = {}
    with open(data, "rb") as fh:
        for raw in fh:
            msg = orjson.loads(raw)
            if msg["type"] == "SCHEMA":
                specs[msg["stream"]] = base.table_spec(msg["stream"], msg["schema"], (), metadata=False,
                                                       schema_name=schema)
                rows.setdefault(msg["stream"], [])
            elif msg["type"] == "RECORD":
                rows[msg["stream"]].append(msg["record"])
    # Rows shaped by each stream's last schema (the users stream gains a column half way).
    payloads = {name: copy_text(specs[name].columns, [tuple(r.get(c.prop) for c in specs[name].columns)
                                                      for r in rows[name]]) for name in specs}
    con = psycopg2.connect(PG_DSN)
    with con.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for name, spec in specs.items():
            cols = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(TYPES[c.type]))
                                      for c in spec.columns)
            cur.execute(sql.SQL("CREATE TABLE {}.{} ({})").format(sql.Identifier(schema), sql.Identifier(spec.table),
                                                                  cols))
    con.commit()
    start = time.monotonic()
    with con.cursor() as cur:
        for name, spec in specs.items():
            cur.copy_expert(sql.SQL("COPY {}.{} FROM STDIN").format(sql.Identifier(schema), sql.Identifier(spec.table))
                            .as_string(cur), io.BytesIO(payloads[name]))
    con.commit()
    con.close()
    return {"seconds": time.monotonic() - start, "schema": schema, "rss": {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--only", nargs="*", help="subset: embedded si1 si2 pipelinewise meltanolabs copy")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="singer-ingest-bench-"))
    data = tmp / "input.singer"
    with open(data, "wb") as fh:
        subprocess.run([sys.executable, str(GEN), "--records", str(args.records)], stdout=fh, check=True)
    tables = ["users", "events", "orders", "wide_metrics"]
    wanted = args.only or ["embedded", "si1", "si2", "pipelinewise", "meltanolabs", "copy"]
    results: dict[str, dict] = {}
    for name in wanted:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        if name == "embedded":
            results[name] = run_singer_ingest_embedded(data, tmp)
        elif name in ("si1", "si2"):
            results[name] = run_singer_ingest_distributed(data, int(name[-1]), tmp)
        elif name == "copy":
            results[name] = run_bare_copy(data)
        else:
            results[name] = run_other(name, data, tmp)
    labels = {"embedded": "singer-ingest embedded (DuckDB)", "si1": "singer-ingest distributed, 1 worker",
              "si2": "singer-ingest distributed, 2 workers", "pipelinewise": "pipelinewise-target-postgres 2.1.2",
              "meltanolabs": "meltanolabs-target-postgres 0.8.1", "copy": "bare COPY (pre-converted rows)"}
    ref = results.get("si1")
    print(f"\ninput: gen_singer.py --records {args.records} (four streams, validation on)\n")
    print(f"{'tool':40s} {'records/s':>12s} {'si1 / tool':>11s}  peak RSS (MB) / row counts")
    for name, r in results.items():
        rate = args.records / r["seconds"]
        ratio = f"{(args.records / ref['seconds']) / rate:.2f}x" if ref else "-"
        rss = ", ".join(f"{k} {v / 1024:.0f}" for k, v in r["rss"].items())
        rows = counts(r["schema"], tables) if "schema" in r else None
        r["rows"] = rows
        extra = f"; Redis peak {r['redis_peak'] / 2**20:.0f} MB" if r.get("redis_peak") else ""
        print(f"{labels[name]:40s} {rate:12,.0f} {ratio:>11s}  {rss}{extra}; rows {rows}")
    loaded = {name: r["rows"] for name, r in results.items() if r.get("rows") and name != "copy"}
    same = len({json.dumps(v, sort_keys=True) for v in loaded.values()}) <= 1
    print(f"\nrow counts agree across the loaders: {same}")
    for r in results.values():
        if "schema" in r:
            drop(r["schema"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
