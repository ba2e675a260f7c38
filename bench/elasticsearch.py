#!/usr/bin/env python3
"""Side by side on one input: singer-ingest into an OpenSearch-compatible server (osmem-server), and
target-elasticsearch 2.1.x.

    python bench/elasticsearch.py --records 1000000 [--only si1 embedded peer]

Measures, on the same gen_singer.py output, each tool against a fresh osmem-server of its own (the in-memory
stand-in the tests use; one process per tool so that neither pays for the other's documents):
- si1: singer-ingest distributed, 1 `rq worker` (validation on), and embedded: one process (fakeredis);
- bare: the records pre-built as ``_bulk`` NDJSON (parsing and conversion excluded; the mappings made from the
  schemas first), sent in requests of 5 MB one after the other: the floor of what loading costs on this server;
- peer: target-elasticsearch 2.1.x (the Singer SDK target for Elasticsearch on PyPI), installed by this script
  into its own virtualenv under ~/.cache/singer-ingest-bench/, configured to upsert the keyed streams (its
  ``metadata_fields`` ``_id``) and to map the free-form ``events.properties`` object as ``enabled: false``
  (with its dynamic mapping the mixed types in it are refused).
Prints records/s, the ratio of singer-ingest (1 worker) to each, peak RSS, and the document count of each index.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import BIN, Sampler, feed_one_worker, generate_input, run_each, timed_sampled as timed  # noqa: E402
from tests import localserver  # noqa: E402  (compare puts the project root on the path)

REDIS_URL = os.environ.get("BENCH_ES_REDIS_URL", "redis://127.0.0.1:6379/14")
PEER = ("target-elasticsearch>=2.1,<2.2", "target-elasticsearch")
PEER_VENV = Path.home() / ".cache" / "singer-ingest-bench" / "target-elasticsearch-2.1"
KEYS = {"users": "id", "orders": "order_id", "wide_metrics": "id"}

# elasticsearch-py 8, which target-elasticsearch uses, sends Elasticsearch's compatibility media types
# (application/vnd.elasticsearch+json; compatible-with=8), which OpenSearch servers refuse (406), and refuses an
# answer without X-Elastic-Product: Elasticsearch. This runs the peer's CLI with those two things changed on
# the wire (plain application/json and x-ndjson; the header added to answers), nothing else.
PEER_SHIM = """
import sys
import elastic_transport
from elastic_transport import HttpHeaders
from elastic_transport.client_utils import DEFAULT
from target_elasticsearch.target import TargetElasticsearch

COMPAT = {"application/vnd.elasticsearch+json; compatible-with=8": "application/json",
          "application/vnd.elasticsearch+x-ndjson; compatible-with=8": "application/x-ndjson"}
perform = elastic_transport.Transport.perform_request

def perform_request(self, method, target, *, headers=DEFAULT, **kwargs):
    if headers is not DEFAULT and headers:
        headers = HttpHeaders({k: COMPAT.get(v, v) for k, v in headers.items()})
    response = perform(self, method, target, headers=headers, **kwargs)
    response.meta.headers["x-elastic-product"] = "Elasticsearch"
    return response

elastic_transport.Transport.perform_request = perform_request
sys.argv[0] = "target-elasticsearch"
TargetElasticsearch.cli()
"""


class Server:
    """A fresh osmem-server on a free loopback port."""

    def __enter__(self) -> "Server":
        from osmem_server import resolve_binary

        self.port = localserver.free_port()
        self.proc = localserver.start([resolve_binary(), "-addr", f"127.0.0.1:{self.port}", "-no-stdin-watch",
                                       "-parent-pid", str(os.getpid())], self.port, "osmem-server")
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        localserver.stop(self.proc)

    def counts(self, prefix: str) -> dict[str, int]:
        http = urllib3.PoolManager()
        http.request("POST", f"{self.url}/_refresh")
        resp = http.request("GET", f"{self.url}/_cat/indices/{prefix}*?format=json&h=index,docs.count")
        out = {}
        for r in sorted(orjson.loads(resp.data), key=lambda r: r["index"]):
            name = re.sub(r"-\d{6}$", "", r["index"][len(prefix):])  # singer-ingest's index behind its alias
            if not name.startswith("_"):  # singer-ingest's offsets
                out[name.replace("-", "_")] = int(r["docs.count"])  # the peer's index names have "-" for "_"
        return out


def si_config(tmp: Path, server: Server) -> Path:
    path = tmp / f"si-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"destination": "elasticsearch", "elasticsearch_url": server.url,
                                "elasticsearch_index_prefix": "si."}))
    return path


def run_si1(data: Path, tmp: Path) -> dict:
    with Server() as server:
        env = {**os.environ, "SINGER_INGEST_ELASTICSEARCH_URL": server.url}
        seconds, rss = feed_one_worker(si_config(tmp, server), data, env, tmp, REDIS_URL,
                                       [("osmem", server.proc.pid)])
        return {"seconds": seconds, "rss": rss, "rows": server.counts("si.")}


def run_embedded(data: Path, tmp: Path) -> dict:
    with Server() as server:
        seconds, rss = timed([str(BIN / "singer-ingest"), "--config", str(si_config(tmp, server))], data,
                             dict(os.environ), "singer-ingest", [("osmem", server.proc.pid)])
        return {"seconds": seconds, "rss": rss, "rows": server.counts("si.")}


def run_bare(data: Path) -> dict:
    """The input's records as _bulk NDJSON built beforehand (ids from the keys), sent in 5 MB requests (not timed:
    building it); indices made first with the mappings the destination would give them."""
    from sinks import base
    from sinks.elasticsearch.destination import document_id, mapping_of

    specs: dict[str, base.TableSpec] = {}
    lines: list[bytes] = []
    for line in data.read_bytes().splitlines():
        msg = orjson.loads(line)
        if msg["type"] == "SCHEMA":
            wanted = base.table_spec(msg["stream"], msg["schema"], tuple(msg.get("key_properties") or ()),
                                     metadata=False, schema_name=None)
            specs[msg["stream"]] = base.merge_specs(specs.get(msg["stream"]), wanted)[0]
        elif msg["type"] == "RECORD":
            spec, rec = specs[msg["stream"]], msg["record"]
            doc_id = document_id(tuple(rec.get(k) for k in spec.key_columns)) if spec.key_columns else \
                str(len(lines))
            lines.append(orjson.dumps({"index": {"_index": f"bare.{spec.table}", "_id": doc_id}}) + b"\n" +
                         orjson.dumps(rec) + b"\n")
    bodies, body = [], []
    size = 0
    for item in lines:
        body.append(item)
        size += len(item)
        if size >= 5_000_000:
            bodies.append(b"".join(body))
            body, size = [], 0
    bodies.append(b"".join(body))
    del lines
    with Server() as server:
        http = urllib3.PoolManager(retries=False)
        for spec in specs.values():
            mapping = orjson.dumps({"mappings": mapping_of(spec.columns)})
            http.request("PUT", f"{server.url}/bare.{spec.table}", body=mapping,
                         headers={"Content-Type": "application/json"})
        with Sampler() as sampler:
            sampler.watch("osmem", server.proc.pid)
            start = time.monotonic()
            for payload in bodies:
                resp = http.request("POST", f"{server.url}/_bulk?filter_path=errors", body=payload,
                                    headers={"Content-Type": "application/x-ndjson"}, timeout=600)
                if resp.status != 200 or orjson.loads(resp.data).get("errors"):
                    raise RuntimeError(f"bare _bulk failed: {resp.data[:300]!r}")
            seconds = time.monotonic() - start
        return {"seconds": seconds, "rss": {k: v // 1024 for k, v in sampler.peaks.items()},
                "rows": server.counts("bare.")}


def peer_python() -> Path:
    spec, exe = PEER
    if not (PEER_VENV / "bin" / exe).exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", spec], check=True)
    return PEER_VENV / "bin" / "python"


def peer_version() -> str:
    out = subprocess.run([str(peer_python()), "-c", "from importlib.metadata import version; "
                          "print(version('target-elasticsearch'))"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_peer(data: Path, tmp: Path) -> dict:
    with Server() as server:
        config = {"scheme": "http", "host": "127.0.0.1", "port": server.port, "index_format": "peer-{{ stream_name }}",
                  "metadata_fields": {stream: {"_id": key} for stream, key in KEYS.items()},
                  "index_mappings": {"events": {"properties": {"type": "object", "enabled": False}}},
                  "request_timeout": 120}
        (tmp / "peer.json").write_text(json.dumps(config))
        seconds, rss = timed([str(peer_python()), "-c", PEER_SHIM, "--config", str(tmp / "peer.json")], data,
                             dict(os.environ), "target-elasticsearch", [("osmem", server.proc.pid)])
        return {"seconds": seconds, "rss": rss, "rows": server.counts("peer-")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--only", nargs="*", default=["si1", "embedded", "bare", "peer"],
                   choices=["si1", "embedded", "bare", "peer"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = generate_input(args.records, tmp)
        print(f"input: gen_singer.py --records {args.records}, each tool against its own osmem-server on loopback")
        runs = {"si1": ("singer-ingest distributed, 1 worker", lambda: run_si1(data, tmp)),
                "embedded": ("singer-ingest embedded", lambda: run_embedded(data, tmp)),
                "bare": ("bare _bulk (pre-built NDJSON)", lambda: run_bare(data)),
                "peer": (f"target-elasticsearch {peer_version() if 'peer' in args.only else ''}",
                         lambda: run_peer(data, tmp))}
        results = run_each(runs, args.only)
        base = results.get("si1", (None, None))[1]
        print(f"\n{'tool':40s} {'records/s':>10s} {'si1 / tool':>11s}  peak RSS (MB) / documents")
        for key, (label, r) in results.items():
            rate = args.records / r["seconds"] if r["seconds"] else 0.0
            ratio = f"{(args.records / base['seconds']) / rate:.2f}x" if base and rate else ""
            rss = ", ".join(f"{k} {v}" for k, v in r["rss"].items())
            print(f"{label:40s} {rate:10,.0f} {ratio:>11s}  {rss}; documents {r['rows']}")
        counts = [r["rows"] for _, r in results.values()]
        print(f"\ndocument counts agree across the loaders: {all(c == counts[0] for c in counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
