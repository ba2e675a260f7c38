#!/usr/bin/env python3
"""Side by side on one input: singer-ingest against the Singer targets of a destination and its bare bulk load.

    python bench/compare.py --records 1000000                         # PostgreSQL
    python bench/compare.py --destination mysql --records 1000000     # MySQL / MariaDB

Measures, on the same gen_singer.py output and the same server (validation on everywhere):
- singer-ingest embedded, and distributed with 1 and 2 `rq worker` processes;
- the destination's Singer targets from PyPI, each installed by this script into its own virtualenv under
  .cache/bench-venvs/ (PostgreSQL: pipelinewise-target-postgres 2.1.2 and meltanolabs-target-postgres 0.8.1;
  MySQL: thk-target-mysql 0.1.3);
- the bare bulk load of the rows pre-converted to its input format (COPY text for PostgreSQL, LOAD DATA LOCAL
  INFILE's tab-separated text for MySQL; parsing and conversion excluded): the floor of what loading costs.
Prints records/s, the ratio of singer-ingest (distributed, 1 worker) to each, peak RSS of every process,
peak Redis memory, and checks every tool loaded the same row counts. A target that cannot load a stream of
the input gets the input without it, and singer-ingest runs once more on that same input for its ratio.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import orjson
import psycopg2
import redis
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import tree_peak_kb  # noqa: E402
from sinks import base  # noqa: E402
from sinks.postgres.destination import TYPES, copy_text  # noqa: E402

BIN = Path(sys.executable).parent
GEN = ROOT.parent / "shared" / "bench" / "gen_singer.py"
VENVS = ROOT / ".cache" / "bench-venvs"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "password": "unused-with-trust-auth", "dbname": "test"}
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
MYSQL_URL = os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
TABLES = ["users", "events", "orders", "wide_metrics"]


@dataclass(frozen=True)
class Peer:
    """A Singer target from PyPI, installed into .cache/bench-venvs/<key>."""

    key: str                                   # its name for --only and its virtualenv
    label: str
    spec: str                                  # pip requirement
    exe: str                                   # console script
    config: Callable[[str], dict]              # target schema -> its config
    pip_args: tuple[str, ...] = ()
    env: Callable[[Path], dict] | None = None  # scratch directory -> extra environment
    skip_streams: tuple[str, ...] = ()         # streams of the input it cannot load: it gets the input without them
    note: str = ""


def venv(peer: Peer) -> Path:
    path = VENVS / peer.key
    if not (path / "bin" / peer.exe).exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", *peer.pip_args, peer.spec], check=True)
    return path / "bin" / peer.exe


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


# -- PostgreSQL ---------------------------------------------------------------------------------------------


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


def specs_and_rows(data: Path, schema: str) -> tuple[dict[str, base.TableSpec], dict[str, list[tuple]]]:
    """Each stream's table (shaped by its last schema: the users stream gains a column half way) and every
    record as a row of it, in input order."""
    specs: dict[str, base.TableSpec] = {}
    records: dict[str, list[dict]] = {}
    with open(data, "rb") as fh:
        for raw in fh:
            msg = orjson.loads(raw)
            if msg["type"] == "SCHEMA":
                specs[msg["stream"]] = base.table_spec(msg["stream"], msg["schema"], (), metadata=False,
                                                       schema_name=schema)
                records.setdefault(msg["stream"], [])
            elif msg["type"] == "RECORD":
                records[msg["stream"]].append(msg["record"])
    return specs, {name: [tuple(r.get(c.prop) for c in specs[name].columns) for r in records[name]]
                   for name in specs}


def run_bare_copy(data: Path) -> dict:
    """COPY of rows already converted to COPY text: no JSON parsing, no validation."""
    schema = f"bench_copy_{uuid.uuid4().hex[:6]}"
    specs, rows = specs_and_rows(data, schema)
    payloads = {name: copy_text(specs[name].columns, rows[name]) for name in specs}
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


# -- MySQL / MariaDB ----------------------------------------------------------------------------------------


def mysql_connect(url: str = MYSQL_URL, **kwargs):
    import pymysql

    u = urlsplit(url)
    return pymysql.connect(host=u.hostname or "127.0.0.1", port=u.port or 3306, user=u.username or "root",
                           password=u.password or "", charset="utf8mb4", **kwargs)


def mysql_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def mysql_counts(database: str, tables: list[str]) -> dict[str, int]:
    con = mysql_connect()
    try:
        with con.cursor() as cur:
            out = {}
            for t in tables:
                cur.execute(f"SELECT COUNT(*) FROM {mysql_ident(database)}.{mysql_ident(t)}")
                out[t] = cur.fetchone()[0]
    finally:
        con.close()
    return out


def mysql_drop(database: str) -> None:
    con = mysql_connect(autocommit=True)
    try:
        with con.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {mysql_ident(database)}")
    finally:
        con.close()


def mysql_create(database: str) -> None:
    con = mysql_connect(autocommit=True)
    try:
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {mysql_ident(database)} CHARACTER SET utf8mb4")
    finally:
        con.close()


def run_bare_load_data(data: Path, tmp: Path) -> dict:
    """LOAD DATA LOCAL INFILE of files already in its text format (made by the MySQL sink's own converter, into
    the column types it uses): no JSON parsing, no validation."""
    from sinks.mysql.destination import TYPES as MYSQL_TYPES, load_text

    database = f"bench_load_{uuid.uuid4().hex[:6]}"
    specs, rows = specs_and_rows(data, database)
    files = {}
    for name, spec in specs.items():
        files[name] = tmp / f"load-{spec.table}.tsv"
        files[name].write_bytes(load_text(spec.columns, rows[name]))
    del rows
    mysql_create(database)
    con = mysql_connect(local_infile=True, autocommit=False)
    try:
        with con.cursor() as cur:
            for spec in specs.values():
                cols = ", ".join(f"{mysql_ident(c.name)} {MYSQL_TYPES[c.type]}" for c in spec.columns)
                cur.execute(f"CREATE TABLE {mysql_ident(database)}.{mysql_ident(spec.table)} ({cols}) ENGINE=InnoDB")
        start = time.monotonic()
        with con.cursor() as cur:
            for name, spec in specs.items():
                cols = ", ".join(mysql_ident(c.name) for c in spec.columns)
                cur.execute(f"LOAD DATA LOCAL INFILE %s INTO TABLE {mysql_ident(database)}.{mysql_ident(spec.table)} "
                            f"CHARACTER SET utf8mb4 ({cols})", (str(files[name]),))
        con.commit()
        seconds = time.monotonic() - start
    finally:
        con.close()
        for f in files.values():
            f.unlink()
    return {"seconds": seconds, "schema": database, "rss": {}}


# -- the destinations ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """What differs between destinations: singer-ingest's config and worker environment, reading back row
    counts, the bare load and the peer targets."""

    name: str
    si_config: Callable[[str], dict]           # target schema -> the feeder's config
    worker_env: dict                           # the workers' own connection settings
    embedded: Callable[[Path], tuple[dict, dict, str | None]]  # scratch dir -> config, env, schema (None: no rows)
    embedded_label: str
    counts: Callable[[str, list[str]], dict[str, int]]
    drop: Callable[[str], None]
    bare_key: str
    bare_label: str
    bare: Callable[[Path, Path], dict]         # input, scratch dir -> result
    peers: dict[str, Peer] = field(default_factory=dict)
    prepare: Callable[[str], None] | None = None  # makes a schema a peer needs before it starts


def _pg_embedded(tmp: Path) -> tuple[dict, dict, str | None]:
    return {"duckdb_path": str(tmp / "bench.duckdb")}, {}, None


def _mysql_embedded(tmp: Path) -> tuple[dict, dict, str | None]:
    schema = f"bench_emb_{uuid.uuid4().hex[:6]}"
    return ({"destination": "mysql", "default_target_schema": schema},
            {"SINGER_INGEST_MYSQL_URL": MYSQL_URL}, schema)


def _quiet_sdk_logging(tmp: Path) -> dict:
    """singer-sdk's logging config with its handler at INFO: thk-target-mysql sets its logger to DEBUG, and
    singer-sdk then formats the whole open batch into a debug line at every record."""
    path = tmp / "sdk-logging.json"
    path.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"console": {"format": "{asctime:23s} | {levelname:8s} | {name:20s} | {message}", "style": "{"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "console",
                                 "stream": "ext://sys.stderr", "level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["default"]}}))
    return {"SINGER_SDK_LOG_CONFIG": str(path)}


def _mysql_url_with(database: str) -> str:
    u = urlsplit(MYSQL_URL)
    return f"mysql://{u.netloc}/{database}"


POSTGRES = Bench(
    name="postgres",
    si_config=lambda schema: {"destination": "postgres", "default_target_schema": schema},
    worker_env={"SINGER_INGEST_POSTGRES_DSN": PG_DSN},
    embedded=_pg_embedded, embedded_label="singer-ingest embedded (DuckDB)",
    counts=counts, drop=drop,
    bare_key="copy", bare_label="bare COPY (pre-converted rows)", bare=lambda data, tmp: run_bare_copy(data),
    peers={
        "pipelinewise": Peer(
            "pipelinewise", "pipelinewise-target-postgres 2.1.2", "pipelinewise-target-postgres==2.1.2",
            "target-postgres",
            lambda schema: {**PG, "default_target_schema": schema, "validate_records": True,
                            "batch_size_rows": 100000, "primary_key_required": False}),
        "meltanolabs": Peer(
            "meltanolabs", "meltanolabs-target-postgres 0.8.1", "meltanolabs-target-postgres==0.8.1",
            "target-postgres",
            lambda schema: {"host": PG["host"], "port": PG["port"], "user": PG["user"], "password": PG["password"],
                            "database": PG["dbname"], "default_target_schema": schema, "validate_records": True}),
    })

MYSQL = Bench(
    name="mysql",
    si_config=lambda schema: {"destination": "mysql", "default_target_schema": schema},
    worker_env={"SINGER_INGEST_MYSQL_URL": MYSQL_URL},
    embedded=_mysql_embedded, embedded_label="singer-ingest embedded (MySQL)",
    counts=mysql_counts, drop=mysql_drop,
    bare_key="load", bare_label="bare LOAD DATA (pre-converted rows)", bare=run_bare_load_data,
    peers={
        # singer-sdk based; validates every record (singer-sdk 0.30 has no switch to turn it off). It declares
        # Requires-Python <=3.11, which pip reads as at most 3.11.0.
        "thk": Peer(
            "thk", "thk-target-mysql 0.1.3", "thk-target-mysql==0.1.3", "target-mysql",
            lambda schema: {"sqlalchemy_url": _mysql_url_with(schema), "default_target_schema": schema},
            pip_args=("--ignore-requires-python",), env=_quiet_sdk_logging,
            # It writes nested values with the standard json module, which cannot encode the Decimal values
            # singer-sdk parses numbers into: orders.items (objects with a number) fails the run with
            # "TypeError: Object of type Decimal is not JSON serializable".
            skip_streams=("orders",),
            note="orders left out: Object of type Decimal is not JSON serializable (orders.items)"),
    },
    prepare=mysql_create)

BENCHES = {b.name: b for b in (POSTGRES, MYSQL)}


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


def generate_input(records: int, tmp: Path) -> Path:
    """``tmp``/input.singer: gen_singer.py's output for ``records`` records (written straight to the file)."""
    data = tmp / "input.singer"
    with open(data, "wb") as fh:
        subprocess.run([sys.executable, str(GEN), "--records", str(records)], stdout=fh, check=True)
    return data


def run_each(runs: dict, only: list[str]) -> dict:
    """Run the ``only`` entries of ``runs`` (key -> (label, call)) in turn: key -> (label, what the call returned);
    a run that fails is reported and left out, the others go on."""
    results = {}
    for key in only:
        label, fn = runs[key]
        try:
            results[key] = (label, fn())
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            print(f"{label}: failed: {str(exc)[-1500:]}")
    return results


def timed_sampled(cmd: list[str], data: Path, env: dict, label: str,
                  watch: list[tuple[str, int]] = ()) -> tuple[float, dict]:
    """Run ``cmd`` on ``data``; its seconds and the peak RSS (MB) of it and of the ``watch`` (label, pid) trees."""
    with Sampler() as sampler:
        for name, pid in watch:
            sampler.watch(name, pid)
        seconds, _, _ = timed(cmd, data, env, sampler, label)
    return seconds, {k: v // 1024 for k, v in sampler.peaks.items()}


def feed_one_worker(config: Path, data: Path, env: dict, tmp: Path, redis_url: str,
                    watch: list[tuple[str, int]] = ()) -> tuple[float, dict]:
    """The feeder of ``config`` on ``data`` with one rq worker (``env``) on an emptied Redis database: the seconds
    and the peak RSS (MB) of the feeder, the worker and the ``watch`` (label, pid) trees (a local server, say)."""
    redis.Redis.from_url(redis_url).flushdb()
    worker = subprocess.Popen([str(BIN / "rq"), "worker", "singer-ingest", "--url", redis_url],
                              stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    time.sleep(1.5)
    try:
        return timed_sampled([str(BIN / "singer-ingest"), "--config", str(config), "--redis-url", redis_url], data,
                             env, "feeder", [("worker", worker.pid), *watch])
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def start_workers(workers: int, schema: str, tmp: Path, bench: Bench = POSTGRES) -> tuple[list[subprocess.Popen], dict]:
    """An empty Redis database, a feeder config loading into ``schema``, and ``workers`` rq workers started;
    returns them and the environment the feeder runs with."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    (tmp / "si.json").write_text(json.dumps(bench.si_config(schema)))
    env = {**os.environ, **bench.worker_env}
    procs = [subprocess.Popen([str(BIN / "rq"), "worker", "singer-ingest", "--url", REDIS_URL],
                              stdout=open(tmp / f"worker{i}.log", "wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True) for i in range(workers)]
    time.sleep(1.5)
    return procs, env


def run_singer_ingest_distributed(data: Path, workers: int, tmp: Path, bench: Bench = POSTGRES) -> dict:
    schema = f"bench_si{workers}_{uuid.uuid4().hex[:6]}"
    conn = redis.Redis.from_url(REDIS_URL)
    procs, env = start_workers(workers, schema, tmp, bench)
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


def run_singer_ingest_embedded(data: Path, tmp: Path, bench: Bench = POSTGRES) -> dict:
    config, extra_env, schema = bench.embedded(tmp)
    (tmp / "emb.json").write_text(json.dumps(config))
    env = {**os.environ, **extra_env} if extra_env else None
    with Sampler() as sampler:
        seconds, _, _ = timed([str(BIN / "singer-ingest"), "--config", str(tmp / "emb.json")], data, env, sampler,
                              "singer-ingest")
    out = {"seconds": seconds, "rss": sampler.peaks}
    if schema is not None:
        out["schema"] = schema
    return out


def run_other(peer: Peer, data: Path, tmp: Path, bench: Bench = POSTGRES) -> dict:
    exe = venv(peer)
    schema = f"bench_{peer.key[:4]}_{uuid.uuid4().hex[:6]}"
    if bench.prepare is not None:
        bench.prepare(schema)
    (tmp / f"{peer.key}.json").write_text(json.dumps(peer.config(schema)))
    env = {**os.environ, **peer.env(tmp)} if peer.env else None
    with Sampler() as sampler:
        seconds, _, _ = timed([str(exe), "--config", str(tmp / f"{peer.key}.json")], data, env, sampler, peer.key)
    return {"seconds": seconds, "schema": schema, "rss": sampler.peaks}


def without_streams(data: Path, streams: tuple[str, ...], out: Path) -> int:
    """The input without the messages of ``streams`` (STATE messages kept); returns its number of records."""
    records = 0
    with open(data, "rb") as src, open(out, "wb") as dst:
        for raw in src:
            msg = orjson.loads(raw)
            if msg.get("stream") in streams:
                continue
            records += msg["type"] == "RECORD"
            dst.write(raw)
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--destination", choices=sorted(BENCHES), default="postgres")
    ap.add_argument("--only", nargs="*", help="subset: embedded si1 si2, the peers (postgres: pipelinewise "
                                              "meltanolabs; mysql: thk), and the bare load (postgres: copy; "
                                              "mysql: load)")
    args = ap.parse_args()
    bench = BENCHES[args.destination]
    tmp = Path(tempfile.mkdtemp(prefix="singer-ingest-bench-"))
    data = generate_input(args.records, tmp)
    wanted = args.only or ["embedded", "si1", "si2", *bench.peers, bench.bare_key]
    unknown = [n for n in wanted if n not in ("embedded", "si1", "si2", *bench.peers, bench.bare_key)]
    if unknown:
        ap.error(f"--only {unknown[0]}: not a tool of --destination {bench.name}")
    labels = {"embedded": bench.embedded_label, "si1": "singer-ingest distributed, 1 worker",
              "si2": "singer-ingest distributed, 2 workers", bench.bare_key: bench.bare_label,
              **{k: p.label for k, p in bench.peers.items()}}
    results: dict[str, dict] = {}
    for name in wanted:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        if name == "embedded":
            results[name] = run_singer_ingest_embedded(data, tmp, bench)
        elif name in ("si1", "si2"):
            results[name] = run_singer_ingest_distributed(data, int(name[-1]), tmp, bench)
        elif name == bench.bare_key:
            results[name] = bench.bare(data, tmp)
        else:
            peer = bench.peers[name]
            if not peer.skip_streams:
                results[name] = run_other(peer, data, tmp, bench)
                continue
            # The peer gets the input without the streams it cannot load, and so does singer-ingest for its ratio.
            subset = tmp / f"input-for-{name}.singer"
            records = without_streams(data, peer.skip_streams, subset)
            tables = [t for t in TABLES if t not in peer.skip_streams]
            if "si1" in wanted:
                ref = f"si1-{name}"
                print(f"running si1 on {name}'s input ...", file=sys.stderr, flush=True)
                results[ref] = {**run_singer_ingest_distributed(subset, 1, tmp, bench), "records": records,
                                "tables": tables}
                labels[ref] = f"singer-ingest 1 worker, no {'/'.join(peer.skip_streams)}"
            results[name] = {**run_other(peer, subset, tmp, bench), "records": records, "tables": tables,
                             "ref": f"si1-{name}", "note": peer.note}
    print(f"\ninput: gen_singer.py --records {args.records} (four streams, validation on), destination "
          f"{bench.name}\n")
    print(f"{'tool':40s} {'records/s':>12s} {'si1 / tool':>11s}  peak RSS (MB) / row counts")
    for name, r in results.items():
        rate = r.get("records", args.records) / r["seconds"]
        ref = results.get(r.get("ref", "si1"))
        ratio = f"{(ref.get('records', args.records) / ref['seconds']) / rate:.2f}x" if ref else "-"
        rss = ", ".join(f"{k} {v / 1024:.0f}" for k, v in r["rss"].items())
        rows = bench.counts(r["schema"], r.get("tables", TABLES)) if "schema" in r else None
        r["rows"] = rows
        extra = f"; Redis peak {r['redis_peak'] / 2**20:.0f} MB" if r.get("redis_peak") else ""
        note = f"; {r['note']}" if r.get("note") else ""
        print(f"{labels[name]:40s} {rate:12,.0f} {ratio:>11s}  {rss}{extra}; rows {rows}{note}")
    # Every loader that loaded a table must agree on its row count (the bare load keeps every record: no upsert).
    per_table: dict[str, set[int]] = {}
    for name, r in results.items():
        if r.get("rows") and name != bench.bare_key:
            for table, n in r["rows"].items():
                per_table.setdefault(table, set()).add(n)
    same = all(len(v) == 1 for v in per_table.values())
    print(f"\nrow counts agree across the loaders: {same}")
    for r in results.values():
        if "schema" in r:
            bench.drop(r["schema"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
