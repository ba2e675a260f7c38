#!/usr/bin/env python3
"""Side by side on one input: singer-ingest into MongoDB, a bare insert_many of the same documents, and
macrometa-target-mongo.

    python bench/mongodb.py --records 1000000 [--only si1 bare macrometa]

Measures, on the same gen_singer.py output and the same server: nx-27017 (a MongoDB wire-protocol server on
SQLite, from the test extra) started on a free loopback port with in-memory databases, or the mongod that
BENCH_MONGODB_URL names:
- si1: singer-ingest distributed, 1 `rq worker` (validation on);
- bare: the documents pre-built in Python (parsing and conversion excluded), written by insert_many(ordered=False)
  in chunks of 5,000: the floor of what writing these documents to this server costs;
- macrometa: macrometa-target-mongo 1.0.0, the MongoDB Singer target on PyPI that installs (it needs Python
  3.8-3.10: this script makes its virtualenv under .cache/bench-venvs/ with a python3.10 from PATH or pyenv). It
  writes every stream into one collection (``target_collection``), so it runs once per stream on that stream's
  messages and the times add up. It only connects with user and password (SCRAM), which nx-27017 does not speak,
  and always serves metrics on port 8001: its CLI runs with the connection string replaced by the server's URL
  and the metrics server left out, nothing else changed. It also fails on the first RECORD whose
  ``time_extracted`` is not written as ``%Y-%m-%dT%H:%M:%S.%fZ`` (gen_singer.py writes ``...+00:00``, as most taps
  do), so it gets the input with ``time_extracted`` rewritten into that form (the same instant).
Prints records/s, the ratio of singer-ingest (1 worker) to each, peak RSS, and the documents in each collection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import VENVS, feed_one_worker, generate_input, timed_sampled as timed  # noqa: E402

from tests import mongoserver  # noqa: E402  (compare puts the project root on the path)

REDIS_URL = os.environ.get("BENCH_MONGODB_REDIS_URL", "redis://127.0.0.1:6379/13")
MACROMETA = "macrometa-target-mongo==1.0.0"

# macrometa-target-mongo's CLI with the two changes the module docstring names.
MACROMETA_LOCAL = """
import os, sys
import macrometa_target_mongo.main as m
m.get_connection_string = lambda config: os.environ["BENCH_PEER_MONGODB_URL"]
m.start_http_server = lambda *args, **kwargs: None
sys.argv[0] = "macrometa-target-mongo"
m.main()
"""


def server_url() -> str:
    return os.environ.get("BENCH_MONGODB_URL") or mongoserver.url()


def client():
    import pymongo

    return pymongo.MongoClient(server_url(), serverSelectionTimeoutMS=10_000)



def counts(database: str) -> dict[str, int]:
    db = client()[database]
    return {name: db[name].count_documents({}) for name in sorted(db.list_collection_names())
            if not name.startswith("_singer_ingest")}


def run_si1(data: Path, tmp: Path) -> dict:
    database = f"bench_si1_{uuid.uuid4().hex[:6]}"
    config = tmp / "si.json"
    config.write_text(json.dumps({"destination": "mongodb", "default_target_schema": database,
                                  "mongodb_decimal128": bool(os.environ.get("BENCH_MONGODB_URL"))}))
    env = {**os.environ, "SINGER_INGEST_MONGODB_URL": server_url()}
    seconds, rss = feed_one_worker(config, data, env, tmp, REDIS_URL)
    return {"seconds": seconds, "database": database, "rss": rss}


def run_bare(data: Path) -> dict:
    """insert_many of documents built beforehand: the key (or the input line) as _id, values as parsed."""
    database = f"bench_bare_{uuid.uuid4().hex[:6]}"
    keys: dict[str, list[str]] = {}
    docs: dict[str, list[dict]] = {}
    for n, line in enumerate(data.read_bytes().splitlines(), 1):
        msg = orjson.loads(line)
        if msg["type"] == "SCHEMA":
            keys[msg["stream"]] = list(msg.get("key_properties") or [])
            docs.setdefault(msg["stream"], [])
        elif msg["type"] == "RECORD":
            rec, k = msg["record"], keys[msg["stream"]]
            docs[msg["stream"]].append({"_id": rec[k[0]] if len(k) == 1 else n, **rec})
    for stream, k in keys.items():  # one document per key, as an upsert leaves
        if k:
            docs[stream] = list({d["_id"]: d for d in docs[stream]}.values())
    db = client()[database]
    start = time.monotonic()
    for stream, items in docs.items():
        for i in range(0, len(items), 5000):
            db[stream].insert_many(items[i:i + 5000], ordered=False)
    return {"seconds": time.monotonic() - start, "database": database, "rss": {}}


def python310() -> str:
    for candidate in [shutil.which("python3.10"), *sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))]:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("macrometa-target-mongo needs Python 3.8-3.10 and no python3.10 is on PATH or in pyenv")


def macrometa_python() -> Path:
    path = VENVS / "macrometa-target-mongo"
    if not (path / "bin" / "macrometa-target-mongo").exists():
        subprocess.run([python310(), "-m", "venv", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", MACROMETA], check=True)
    return path / "bin" / "python"


def run_macrometa(data: Path, tmp: Path, streams: list[str]) -> dict:
    python = macrometa_python()
    database = f"bench_macro_{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "BENCH_PEER_MONGODB_URL": server_url().rstrip("/") + f"/{database}"}
    per_stream: dict[str, list[bytes]] = {s: [] for s in streams}
    for line in data.read_bytes().splitlines(keepends=True):
        msg = orjson.loads(line)
        if msg.get("stream") in per_stream:
            if "time_extracted" in msg:
                at = datetime.fromisoformat(msg["time_extracted"]).astimezone(timezone.utc)
                msg["time_extracted"] = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                line = orjson.dumps(msg) + b"\n"
            per_stream[msg["stream"]].append(line)
    seconds, rss, failed, records = 0.0, {}, {}, 0
    for stream, lines in per_stream.items():
        part = tmp / f"macro-{stream}.singer"
        part.write_bytes(b"".join(lines))
        config = {"host": "unused", "user": "unused", "password": "unused", "auth_database": "admin",
                  "database": database, "target_collection": stream, "batch_size_rows": 10000,
                  "batch_flush_interval": 1, "batch_flush_min_time_gap": 1}
        (tmp / "macro.json").write_text(json.dumps(config))
        try:
            # it reads stdin through an asyncio pipe transport, which refuses a file: a pipe from cat
            took, peaks = timed(["sh", "-c", 'cat | "$0" -c "$1" --config "$2"', str(python), MACROMETA_LOCAL,
                                 str(tmp / "macro.json")], part, env, "macrometa")
        except RuntimeError as exc:
            lines_ = [x for x in str(exc).strip().splitlines() if "Error" in x or "Exception" in x]
            failed[stream] = (lines_ or str(exc).strip().splitlines())[-1].strip()
            continue
        finally:
            part.unlink()
        seconds += took
        records += sum(1 for line in lines if b'"RECORD"' in line[:30])
        rss = {k: max(rss.get(k, 0), v) for k, v in peaks.items()}
    return {"seconds": seconds, "database": database, "rss": rss, "failed": failed, "records": records}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--only", nargs="*", default=["si1", "bare", "macrometa"], choices=["si1", "bare", "macrometa"])
    args = p.parse_args()
    where = "BENCH_MONGODB_URL" if os.environ.get("BENCH_MONGODB_URL") else "nx-27017 on loopback (in-memory)"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = generate_input(args.records, tmp)
        streams = sorted({orjson.loads(line)["stream"] for line in data.read_bytes().splitlines()
                          if b'"SCHEMA"' in line[:30]})
        print(f"input: gen_singer.py --records {args.records} ({len(streams)} streams), server: {where}")
        runs = {"si1": ("singer-ingest distributed, 1 worker", lambda: run_si1(data, tmp)),
                "bare": ("bare insert_many (documents pre-built)", lambda: run_bare(data)),
                "macrometa": (MACROMETA, lambda: run_macrometa(data, tmp, streams))}
        results: dict[str, dict] = {}
        for key in args.only:
            label, fn = runs[key]
            results[key] = fn()
            r = results[key]
            r.setdefault("records", args.records)
            rate = r["records"] / r["seconds"] if r["seconds"] else 0.0
            rss = ", ".join(f"{k} {v} MB" for k, v in r["rss"].items())
            print(f"{label:45s} {r['seconds']:8.1f} s {rate:10,.0f} records/s  peak RSS: {rss or '-'}")
            print(f"{'':45s} documents: {counts(r['database'])}")
            if r.get("failed"):
                print(f"{'':45s} FAILED streams: {r['failed']}")
            client().drop_database(r["database"])
        if "si1" in results:
            si_rate = results["si1"]["records"] / results["si1"]["seconds"]
            for key, r in results.items():
                if key != "si1" and r["seconds"]:
                    print(f"singer-ingest (1 worker) / {runs[key][0]}: {si_rate / (r['records'] / r['seconds']):.2f}x "
                          f"(records/s; {r['records']:,} records loaded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
