#!/usr/bin/env python3
"""Side by side on one input: singer-ingest (1 `rq worker`) and meltanolabs-target-snowflake into the same local
Snowflake stand-in (fakesnow in server mode).

    flock /tmp/singer-ingest-bench.lock .venv/bin/python bench/snowflake_compare.py --records 1000000

Measures, on the same gen_singer.py output and the same fakesnow server (started by this script from the
virtualenv scripts/test.sh makes, on a free loopback port):
- si1: singer-ingest distributed, 1 `rq worker` (validation on);
- meltanolabs: meltanolabs-target-snowflake 0.20.4 (the Singer SDK target for Snowflake), installed by this script
  into its own virtualenv under .cache/bench-venvs/.
Both load with ``--load-method`` (default append-only: the stand-in cannot run the peer's upsert, a MERGE whose
source is a SELECT from a stage; singer-ingest then COPYs straight into each table). Prints wall seconds,
records/s, the ratio, the CPU seconds of each process (the loader's processes and the server: where the time
goes), peak RSS, and the row counts of every table, which must agree.

The peer runs as it is, through a wrapper (below) that only points it at the local server: host, port and http
added to its connection arguments (with its schema as the session's, which the stand-in's COPY wants), and its stage location (``'@~/...'``: the stand-in takes neither the user stage
nor a location in quotes) swapped for a named internal stage this script makes, and the column aliases of its COPY's
SELECT dropped (COPY maps columns by position; the stand-in resolves ``$1:id AS id`` to the alias); its REMOVE of the staged files after each load is skipped (the stand-in has no
REMOVE; singer-ingest's COPY purges its files as it loads).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import BIN, VENVS, Sampler, generate_input  # noqa: E402

from tests import snowserver  # noqa: E402  (compare puts the project root on the path)

REDIS_URL = os.environ.get("BENCH_SNOWFLAKE_REDIS_URL", "redis://127.0.0.1:6379/13")
PEER = ("meltanolabs-target-snowflake==0.20.4", "target-snowflake")
TABLES = ["users", "events", "orders", "wide_metrics"]

PEER_LOCAL = r"""
import os, re, sys
from sqlalchemy import text
from target_snowflake.connector import SnowflakeConnector
from target_snowflake.target import TargetSnowflake

args = SnowflakeConnector.get_connect_args
SnowflakeConnector.get_connect_args = lambda self: {**args(self), "host": "127.0.0.1",
                                                    "port": int(os.environ["BENCH_SNOWFLAKE_PORT"]), "protocol": "http",
                                                    "schema": os.environ["BENCH_SNOWFLAKE_SCHEMA"]}
stage = os.environ["BENCH_SNOWFLAKE_STAGE"]


def restage(method):
    def wrapped(self, *a, **kw):
        clause, kwargs = method(self, *a, **kw)
        sql = re.sub(r"'@~/([^']*)'", lambda m: stage + "/" + m.group(1), clause.text)
        if sql.lstrip().lower().startswith("copy into"):  # COPY maps columns by position: the aliases are unused
            sql = re.sub(r"(\$1:[^,]*?::[A-Z_0-9(), ]+?) as \w+", r"\1", sql)
        return text(sql), kwargs
    return wrapped


for name in ("_get_put_statement", "_get_copy_statement", "_get_merge_from_stage_statement"):
    setattr(SnowflakeConnector, name, restage(getattr(SnowflakeConnector, name)))
SnowflakeConnector.remove_staged_files = lambda self, sync_id: None  # the stand-in has no REMOVE
sys.argv[0] = "target-snowflake"
TargetSnowflake.cli()
"""


def peer_python() -> Path:
    spec, exe = PEER
    path = VENVS / "meltanolabs-snowflake"
    if not (path / "bin" / exe).exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", spec], check=True)
    return path / "bin" / "python"


def query(sql: str, args=()):
    con = snowserver.connect()
    try:
        cur = con.cursor()
        cur.execute(sql, list(args))
        return cur.fetchall() if cur.description else None
    finally:
        con.close()


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a live process and of its children it waited for (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str], data: Path, env: dict, label: str, sampler: Sampler) -> tuple[float, float]:
    """Run ``cmd`` on ``data``: its wall seconds and CPU seconds (its own and its children's)."""
    start = time.monotonic()
    with open(data, "rb") as fh:
        proc = subprocess.Popen(cmd, stdin=fh, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        sampler.watch(label, proc.pid)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed: {err.decode()[-3000:]}")
    return time.monotonic() - start, usage.ru_utime + usage.ru_stime


def counts(schema: str) -> dict[str, int]:
    db = f'"{snowserver.DATABASE}"'
    return {t: query(f'SELECT COUNT(*) FROM {db}."{schema}"."{t.upper()}"')[0][0] for t in TABLES}


def run_si1(data: Path, tmp: Path, method: str, server_pid: int) -> dict:
    import redis

    schema = f"BENCH_SI_{uuid.uuid4().hex[:6].upper()}"
    redis.Redis.from_url(REDIS_URL).flushdb()
    config = tmp / "si.json"
    config.write_text(json.dumps({"destination": "snowflake", "default_target_schema": schema,
                                  "load_method": method}))
    env = {**os.environ, **{f"SINGER_INGEST_{k.upper()}": str(v) for k, v in snowserver.connection().items()}}
    worker = subprocess.Popen([str(BIN / "rq"), "worker", "singer-ingest", "--url", REDIS_URL],
                              stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    time.sleep(1.5)
    server_before = cpu_seconds(server_pid)
    worker_before = cpu_seconds(worker.pid)
    try:
        with Sampler() as sampler:
            sampler.watch("worker", worker.pid)
            sampler.watch("fakesnow", server_pid)
            seconds, feeder_cpu = run([str(BIN / "singer-ingest"), "--config", str(config), "--redis-url",
                                       REDIS_URL], data, env, "feeder", sampler)
            worker_cpu = cpu_seconds(worker.pid) - worker_before  # rq's work horses, waited for by the worker
            for child in _children(worker.pid):
                worker_cpu += cpu_seconds(child)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    return {"seconds": seconds, "schema": schema, "rss": sampler.peaks,
            "cpu": {"feeder": feeder_cpu, "worker": worker_cpu, "fakesnow": cpu_seconds(server_pid) - server_before}}


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out + [g for c in out for g in _children(c)]


def run_peer(data: Path, tmp: Path, method: str, server_pid: int) -> dict:
    python = peer_python()
    schema = f"BENCH_ML_{uuid.uuid4().hex[:6].upper()}"
    db = f'"{snowserver.DATABASE}"'
    query(f"CREATE DATABASE IF NOT EXISTS {db}")
    query(f'CREATE SCHEMA IF NOT EXISTS {db}."{schema}"')
    query(f'CREATE STAGE IF NOT EXISTS {db}."{schema}"."PEER_STAGE"')
    conn = snowserver.connection()
    config = {"account": conn["snowflake_account"], "user": conn["snowflake_user"],
              "password": conn["snowflake_password"], "database": snowserver.DATABASE, "default_target_schema": schema,
              "load_method": method, "add_record_metadata": True, "clean_up_batch_files": False,
              "validate_records": True}
    (tmp / "peer.json").write_text(json.dumps(config))
    env = {**os.environ, "BENCH_SNOWFLAKE_PORT": str(conn["snowflake_port"]),
           "BENCH_SNOWFLAKE_STAGE": f'@{db}."{schema}"."PEER_STAGE"', "BENCH_SNOWFLAKE_SCHEMA": schema}
    server_before = cpu_seconds(server_pid)
    with Sampler() as sampler:
        sampler.watch("fakesnow", server_pid)
        seconds, cpu = run([str(python), "-c", PEER_LOCAL, "--config", str(tmp / "peer.json")], data, env,
                           "target-snowflake", sampler)
    return {"seconds": seconds, "schema": schema, "rss": sampler.peaks,
            "cpu": {"target-snowflake": cpu, "fakesnow": cpu_seconds(server_pid) - server_before}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--load-method", default="append-only", choices=["append-only", "upsert"])
    p.add_argument("--only", nargs="*", default=["si1", "meltanolabs"], choices=["si1", "meltanolabs"])
    args = p.parse_args()
    snowserver.port()
    server_pid = int(subprocess.run(["pgrep", "-n", "-f", f"fakesnow -s --host 127.0.0.1 -p {snowserver.port()}"],
                                    capture_output=True, text=True, check=True).stdout.split()[0])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = generate_input(args.records, tmp)
        print(f"input: gen_singer.py --records {args.records} (four streams, validation on), load method "
              f"{args.load_method}, fakesnow 0.12.1 server on loopback", flush=True)
        runs = {"si1": ("singer-ingest distributed, 1 worker", run_si1),
                "meltanolabs": (PEER[0], run_peer)}
        results = {}
        for key in args.only:
            label, fn = runs[key]
            print(f"running {key} ...", file=sys.stderr, flush=True)
            try:
                results[key] = (label, fn(data, tmp, args.load_method, server_pid))
            except RuntimeError as exc:
                print(f"{label}: failed: {exc}")
        base = results.get("si1", (None, None))[1]
        print(f"\n{'tool':40s} {'seconds':>8s} {'records/s':>10s} {'si1 / tool':>11s}  CPU seconds; peak RSS (MB); "
              f"row counts")
        agree = set()
        for key, (label, r) in results.items():
            rate = args.records / r["seconds"]
            ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else ""
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu"].items())
            rss = ", ".join(f"{k} {v // 1024}" for k, v in r["rss"].items())
            rows = counts(r["schema"])
            agree.add(tuple(sorted(rows.items())))
            print(f"{label:40s} {r['seconds']:8.1f} {rate:10,.0f} {ratio:>11s}  {cpu}; {rss}; {rows}")
        print(f"\nrow counts agree: {len(agree) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
