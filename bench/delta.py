#!/usr/bin/env python3
"""Side by side on one input: singer-ingest into Delta Lake on S3 (a local moto server), a bare write_deltalake
of the same rows, and target-s3-delta.

    python bench/delta.py --records 1000000 [--only si1 embedded bare s3delta]

Measures, on the same gen_singer.py output and the same local S3 server (moto_server, its own process):
- si1: singer-ingest distributed, 1 `rq worker` (validation on), and embedded: one process (fakeredis);
- bare: the rows pre-converted to one Arrow table per stream (parsing and conversion excluded), each written by
  one write_deltalake append: the floor of what writing Delta on this S3 costs;
- s3delta: target-s3-delta (the Singer SDK target for Delta on S3 on PyPI), installed by this script into its
  own virtualenv under .cache/bench-venvs/.
Prints records/s, the ratio of singer-ingest (1 worker) to each, peak RSS, and the row counts of each table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import BIN, VENVS, feed_one_worker, generate_input, run_each, timed_sampled as timed  # noqa: E402

from tests import s3server  # noqa: E402  (compare puts the project root on the path)

REDIS_URL = os.environ.get("BENCH_DELTA_REDIS_URL", "redis://127.0.0.1:6379/14")
S3DELTA = ("target-s3-delta==0.0.25", "target-s3-delta")




def counts(uri: str, tables: list[str]) -> dict[str, int]:
    from deltalake import DeltaTable

    opts = storage_options()
    return {t: DeltaTable(f"{uri}/{t}", storage_options=opts).count() for t in tables}


def storage_options() -> dict:
    from ingest.config import ConnectionSettings
    from sinks.delta.destination import storage_options as options

    return options(ConnectionSettings(destination_settings=s3server.connection()))


def si_config(tmp: Path, uri: str) -> Path:
    path = tmp / f"si-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"destination": "delta", "delta_uri": uri, **s3server.connection()}))
    return path


def run_si1(data: Path, tmp: Path) -> dict:
    uri = f"s3://{s3server.BUCKET}/si1-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **{f"SINGER_INGEST_{k.upper()}": str(v) for k, v in s3server.connection().items()}}
    seconds, rss = feed_one_worker(si_config(tmp, uri), data, env, tmp, REDIS_URL)
    return {"seconds": seconds, "uri": uri, "rss": rss}


def run_embedded(data: Path, tmp: Path) -> dict:
    uri = f"s3://{s3server.BUCKET}/emb-{uuid.uuid4().hex[:6]}"
    seconds, rss = timed([str(BIN / "singer-ingest"), "--config", str(si_config(tmp, uri))], data, dict(os.environ),
                         "singer-ingest")
    return {"seconds": seconds, "uri": uri, "rss": rss}


def run_bare(data: Path) -> dict:
    """One write_deltalake append per stream of rows already in Arrow (parsing and conversion not timed)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from sinks import base
    from sinks.columnar import arrow_table
    from sinks.delta.destination import physical_spec

    specs: dict[str, base.TableSpec] = {}
    records: dict[str, list] = {}
    for line in data.read_bytes().splitlines():
        msg = orjson.loads(line)
        if msg["type"] == "SCHEMA":  # a stream's later SCHEMA widens its table, as the destination does
            wanted = base.table_spec(msg["stream"], msg["schema"], tuple(msg.get("key_properties") or ()),
                                     metadata=False, schema_name=None)
            specs[msg["stream"]] = base.merge_specs(specs.get(msg["stream"]), wanted)[0]
            records.setdefault(msg["stream"], [])
        elif msg["type"] == "RECORD":
            records[msg["stream"]].append(msg["record"])
    tables: dict[str, pa.Table] = {}
    for stream, recs in records.items():
        spec = physical_spec(specs[stream])
        props = [c.prop or c.name for c in spec.columns]
        tables[stream] = arrow_table(spec, [tuple(r.get(p) for p in props) for r in recs])
    del records
    uri = f"s3://{s3server.BUCKET}/bare-{uuid.uuid4().hex[:6]}"
    opts = storage_options()
    start = time.monotonic()
    for stream, table in tables.items():
        write_deltalake(f"{uri}/{stream}", table, mode="append", storage_options=opts)
    return {"seconds": time.monotonic() - start, "uri": uri, "rss": {}}


def s3delta_exe() -> Path:
    spec, exe = S3DELTA
    path = VENVS / "target-s3-delta"
    if not (path / "bin" / exe).exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        # its pyarrow 12 was built against numpy 1.x, which it does not pin
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", spec, "numpy<2"], check=True)
    return path / "bin" / exe


# target-s3-delta builds its storage options from its own config, which has no endpoint setting, and its deltalake
# (0.10) reads neither AWS_ENDPOINT_URL nor AWS_ALLOW_HTTP from the environment: this runs its CLI with the local
# server's endpoint added to those options, nothing else changed.
S3DELTA_LOCAL = """
import os, sys
from target_s3_delta.target import TargetS3Delta
options = TargetS3Delta.get_storage_options
TargetS3Delta.get_storage_options = lambda self: {**options(self), "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
                                                  "AWS_ALLOW_HTTP": "true"}
sys.argv[0] = "target-s3-delta"
TargetS3Delta.cli()
"""


def run_s3delta(data: Path, tmp: Path, streams: list[str]) -> dict:
    """target-s3-delta writes every stream of its input into the one table of s3_path (with the first batch's
    schema), so it runs once per stream, on that stream's messages; the times add up. It gathers batches as
    Parquet files in /tmp/meltano_temp_data/ and writes them in one commit at the end of the input (with
    AWS_S3_ALLOW_UNSAFE_RENAME, which it sets itself), leaving the files there: they are removed before each
    run, or the next run would load them again."""
    import shutil

    exe = s3delta_exe()
    prefix = f"s3delta-{uuid.uuid4().hex[:6]}"
    conn = s3server.connection()
    env = {**os.environ, "AWS_ENDPOINT_URL": conn["delta_s3_endpoint_url"], "AWS_ALLOW_HTTP": "true",
           "AWS_REGION": conn["delta_s3_region"]}
    per_stream: dict[str, list[bytes]] = {s: [] for s in streams}
    for line in data.read_bytes().splitlines(keepends=True):
        msg = orjson.loads(line)
        if msg.get("stream") in per_stream:
            per_stream[msg["stream"]].append(line)
    seconds, rss, records, failed = 0.0, {}, 0, {}
    for stream, lines in per_stream.items():
        shutil.rmtree("/tmp/meltano_temp_data", ignore_errors=True)
        part = tmp / f"s3delta-{stream}.singer"
        part.write_bytes(b"".join(lines))
        config = {"s3_path": f"s3://{s3server.BUCKET}/{prefix}/{stream}", "mode": "append",
                  "aws_access_key_id": conn["delta_s3_access_key_id"],
                  "aws_secret_access_key": conn["delta_s3_secret_access_key"], "aws_region": conn["delta_s3_region"]}
        (tmp / "s3delta.json").write_text(json.dumps(config))
        try:
            took, peaks = timed([str(exe.parent / "python"), "-c", S3DELTA_LOCAL, "--config",
                                 str(tmp / "s3delta.json")], part, env, "target-s3-delta")
        except RuntimeError as exc:
            failed[stream] = str(exc).strip().splitlines()[-1]
            continue
        finally:
            part.unlink()
        seconds += took
        records += sum(1 for line in lines if b'"RECORD"' in line[:30])
        rss = {k: max(rss.get(k, 0), v) for k, v in peaks.items()}
    shutil.rmtree("/tmp/meltano_temp_data", ignore_errors=True)
    return {"seconds": seconds, "uri": f"s3://{s3server.BUCKET}/{prefix}", "rss": rss, "records": records,
            "failed": failed, "streams": [s for s in streams if s not in failed]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--only", nargs="*", default=["si1", "embedded", "bare", "s3delta"],
                   choices=["si1", "embedded", "bare", "s3delta"])
    args = p.parse_args()
    from deltalake.exceptions import DeltaError
    s3server.endpoint()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = generate_input(args.records, tmp)
        streams = sorted({orjson.loads(line)["stream"] for line in data.read_bytes().splitlines()
                          if b'"SCHEMA"' in line[:30]})
        print(f"input: gen_singer.py --records {args.records} ({len(streams)} streams), moto_server on loopback")
        runs = {"si1": ("singer-ingest distributed, 1 worker", lambda: run_si1(data, tmp)),
                "embedded": ("singer-ingest embedded", lambda: run_embedded(data, tmp)),
                "bare": ("bare write_deltalake (pre-converted Arrow)", lambda: run_bare(data)),
                "s3delta": (f"{S3DELTA[0]}", lambda: run_s3delta(data, tmp, streams))}
        results = run_each(runs, args.only)
        base = results.get("si1", (None, None))[1]
        print(f"\n{'tool':46s} {'records/s':>10s} {'si1 / tool':>11s}  peak RSS (MB) / row counts")
        for key, (label, r) in results.items():
            rate = r.get("records", args.records) / r["seconds"] if r["seconds"] else 0.0
            ratio = f"{(args.records / base['seconds']) / rate:.2f}x" if base and rate else ""
            try:
                rows = counts(r["uri"], r.get("streams", streams))
            except (OSError, DeltaError) as exc:  # a tool that names its tables otherwise: shown, not fatal
                rows = f"(could not read: {type(exc).__name__})"
            rss = ", ".join(f"{k} {v}" for k, v in r["rss"].items())
            print(f"{label:46s} {rate:10,.0f} {ratio:>11s}  {rss}; rows {rows}")
            for stream, why in r.get("failed", {}).items():
                print(f"    {label} failed on stream {stream} (not counted in its rate): {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
