#!/usr/bin/env python3
"""The worker's feed path alone, this tree against another revision, in one process.

    python bench/feed.py [--against HEAD~1] [--records 60000] [--rounds 16]

Then, this tree alone: the cost of stream maps (an alias, one property dropped, one md5 of a property: the
general path through singer-sdk's mapper), of flattening (depth 1) and of bad_records=dead_letter, against the
same tree without them.

Feeds gen_singer.py output (one undeclared key added to every record for the second half of the table)
to each stream's sink with a destination that keeps nothing, through the typed decoder and through the
general path (validator), and prints the CPU nanoseconds per record of each tree: the best of
``--rounds`` rounds, the two trees taking turns. The other revision's ``workers`` package is read from git
into a temporary directory; the rest (ingest, sinks) is this tree's.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from ingest.config import RunSettings  # noqa: E402
from ingest.messages import record_stream  # noqa: E402
from ingest.wire import Chunk  # noqa: E402
from sinks.base import Destination  # noqa: E402
from workers.leases import Lease  # noqa: E402

GEN = ROOT.parent / "shared" / "bench" / "gen_singer.py"


class Discard(Destination):
    def claim_stream(self, run_id, stream, fence):
        return 0

    def ensure_table(self, spec):
        return spec

    def write_batch(self, spec, batch):
        pass

    def activate_version(self, spec, version, **kwargs):
        pass

    def close(self):
        pass


def other_workers(rev: str, into: Path):
    """The ``workers`` package of ``rev``, importable as ``workers_other``."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "workers"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as tf:
        tf.extractall(into, filter="data")
    (into / "workers").rename(into / "workers_other")
    sys.path.insert(0, str(into))
    return importlib.import_module("workers_other.stream")


def chunks(records: int, undeclared: bool) -> dict[str, list[Chunk]]:
    data = subprocess.run([sys.executable, str(GEN), "--records", str(records), "--no-schema-change"], check=True,
                          capture_output=True).stdout.splitlines()
    by = defaultdict(list)
    for n, raw in enumerate(data, 1):
        stream = record_stream(raw)
        if stream is None:
            msg = orjson.loads(raw)
            if msg["type"] != "SCHEMA":
                continue
            stream = msg["stream"]
        elif undeclared:
            msg = orjson.loads(raw)
            msg["record"]["zz_undeclared"] = n
            raw = orjson.dumps(msg)
        by[stream].append((n, raw))
    return {s: [Chunk(b"0-%d" % i, [q for q, _ in items[i:i + 500]], [r for _, r in items[i:i + 500]], 0.0, 0)
                for i in range(0, len(items), 500)] for s, items in by.items()}


def feed_seconds(module, streams: dict[str, list[Chunk]], typed: bool, **settings) -> float:
    run = RunSettings(batch_size_rows=10 ** 7, **settings)
    extra = {}
    if settings:
        from ingest.config import ConnectionSettings
        from workers.maps import Mapper, wanted

        extra = {"mapper": Mapper(run, ConnectionSettings()) if wanted(run) else None}
    started = time.process_time()
    for name, entries in streams.items():
        sink = module.StreamSink(run_id="bench", name=name, sid=0, lease=Lease(0, b"t", 1), committed_seq=0,
                                 settings=run, destination=Discard(), sequence_base=0, **extra)
        sink.feed(entries[0])  # the SCHEMA and the first records
        if not typed:
            sink._decoder = None
        for entry in entries[1:]:
            sink.feed(entry)
    return time.process_time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD~1", help="git revision to compare with (default HEAD~1)")
    ap.add_argument("--records", type=int, default=60_000, help="records from gen_singer.py (default 60000)")
    ap.add_argument("--rounds", type=int, default=16, help="rounds per tree; the best counts (default 16)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the warnings about undeclared keys
    this = importlib.import_module("workers.stream")
    with tempfile.TemporaryDirectory() as tmp:
        other = other_workers(args.against, Path(tmp))
        print(f"ns of CPU per record fed, best of {args.rounds} rounds; {args.against} against this tree")
        for undeclared in (False, True):
            streams = chunks(args.records, undeclared)
            n = sum(len(c.seqs) for entries in streams.values() for c in entries)
            for typed in (True, False):
                best = {args.against: float("inf"), "this tree": float("inf")}
                for i in range(args.rounds):
                    order = ((args.against, other), ("this tree", this))
                    for label, module in order if i % 2 else order[::-1]:
                        best[label] = min(best[label], feed_seconds(module, streams, typed))
                old, new = best[args.against] / n * 1e9, best["this tree"] / n * 1e9
                what = f"{'typed decoder' if typed else 'general path '}, " + \
                    ("an undeclared key in every record" if undeclared else "no undeclared keys")
                print(f"{what:52s} {old:7.0f} {new:7.0f}  ({(new / old - 1) * 100:+.1f} %)")
        streams = chunks(args.records, False)
        n = sum(len(c.seqs) for entries in streams.values() for c in entries)
        keys = {"events": "event_id", "orders": "order_id"}  # (the others' key is id)
        maps = {name: {"__alias__": f"{name}_mapped", "email": None, "h": f"md5(str({keys.get(name, 'id')}))"}
                for name in streams}
        print(f"\nthis tree, ns of CPU per record fed, best of {args.rounds // 2} rounds; against the same tree "
              f"without the setting")
        for label, settings in [("stream maps (alias, drop, md5)", {"stream_maps": maps}),
                                ("flattening, depth 1", {"flattening_enabled": True, "flattening_max_depth": 1}),
                                ("bad_records=dead_letter, no bad record", {"bad_records": "dead_letter"})]:
            base_ns = min(feed_seconds(this, streams, True) for _ in range(args.rounds // 2)) / n * 1e9
            ns = min(feed_seconds(this, streams, True, **settings) for _ in range(args.rounds // 2)) / n * 1e9
            print(f"{label:52s} {base_ns:7.0f} {ns:7.0f}  (x{ns / base_ns:.2f})")


if __name__ == "__main__":
    main()
