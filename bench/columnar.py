#!/usr/bin/env python3
"""What a batch as an Arrow table costs, and whether DuckDB would load faster from it.

    python bench/columnar.py --records 200000

Takes each stream of gen_singer.py output as the worker's rows (typed as the worker makes them) and measures,
per stream, in batches of --batch-rows:
- build: ``sinks.columnar.arrow_table`` (what ``Batch.arrow`` costs a destination that wants Arrow);
- DuckDB today: ``DuckDBDestination.write_batch`` (rows written as NDJSON, read back by ``read_json``);
- DuckDB from Arrow: the same table, rows and offset in one transaction, inserted from the Arrow table
  (build included).
Needs pyarrow (not a dependency of the embedded default): ``pip install pyarrow``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sinks import base  # noqa: E402
from sinks.base import Batch  # noqa: E402
from sinks.columnar import arrow_table  # noqa: E402
from sinks.duckdb.destination import DuckDBDestination, quote  # noqa: E402

GEN = ROOT.parent / "shared" / "bench" / "gen_singer.py"


def streams(records: int) -> dict[str, tuple[dict, tuple, list[dict]]]:
    out: dict[str, tuple[dict, tuple, list[dict]]] = {}
    data = subprocess.run([sys.executable, str(GEN), "--records", str(records)], check=True,
                          capture_output=True).stdout
    for raw in data.splitlines():
        msg = orjson.loads(raw)
        if msg["type"] == "SCHEMA":
            old = out.get(msg["stream"])
            out[msg["stream"]] = (msg["schema"], tuple(msg.get("key_properties") or ()), old[2] if old else [])
        elif msg["type"] == "RECORD":
            out[msg["stream"]][2].append(msg["record"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--batch-rows", type=int, default=10_000)
    args = p.parse_args()
    print(f"input: gen_singer.py --records {args.records}, batches of {args.batch_rows} rows, append\n")
    print(f"{'stream':14} {'rows':>8} {'build Arrow':>12} {'DuckDB NDJSON':>14} {'DuckDB Arrow':>13} {'Arrow/NDJSON':>13}")
    totals = [0.0, 0.0, 0.0]
    arrow_table(base.table_spec("warm", {"properties": {"a": {"type": "integer"}}}, (), metadata=False,
                                schema_name=None), [(1,)])  # pyarrow's import and first call, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        for name, (schema, _keys, records) in streams(args.records).items():
            spec0 = base.table_spec(name, schema, (), metadata=False, schema_name=None)
            props = [c.prop for c in spec0.columns]
            rows = [list(map(r.get, props)) for r in records]
            chunks = [rows[i:i + args.batch_rows] for i in range(0, len(rows), args.batch_rows)]
            times = []
            build = 0.0
            for route in ("ndjson", "arrow"):
                d = DuckDBDestination(str(Path(tmp) / f"{name}-{route}.duckdb"), "bench")
                spec = d.ensure_table(spec0)
                d.claim_stream("r", name, 1)
                started = time.perf_counter()
                upto = 0
                for chunk in chunks:
                    upto += len(chunk)
                    batch = Batch(rows=[list(r) for r in chunk], upto_seq=upto, run_id="r", fence=1, upsert=False)
                    if route == "ndjson":
                        d.write_batch(spec, batch)
                        continue
                    b0 = time.perf_counter()
                    table = batch.arrow(spec)
                    build += time.perf_counter() - b0

                    def fn(con, table=table, upto=upto):
                        con.register("arrow_batch", table)
                        d._check_fence(con, "r", name, 1)
                        cols = ", ".join(quote(c.name) for c in spec.columns)
                        con.execute(f"INSERT INTO {d._q(spec.table)} ({cols}) SELECT {cols} FROM arrow_batch").fetchall()
                        con.unregister("arrow_batch")
                        d._set_offset(con, "r", name, upto, 1)

                    d._run(name, "arrow batch", fn)
                times.append(time.perf_counter() - started)
                d.close()
            totals = [totals[0] + build, totals[1] + times[0], totals[2] + times[1]]
            print(f"{name:14} {len(rows):>8} {build:>11.3f}s {times[0]:>13.3f}s {times[1]:>12.3f}s "
                  f"{times[1] / times[0]:>12.2f}x")
    print(f"{'all':14} {'':>8} {totals[0]:>11.3f}s {totals[1]:>13.3f}s {totals[2]:>12.3f}s "
          f"{totals[2] / totals[1]:>12.2f}x")


if __name__ == "__main__":
    main()
