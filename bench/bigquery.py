#!/usr/bin/env python3
"""Side by side on one input and one local BigQuery server: singer-ingest into BigQuery and z3-target-bigquery.

    python bench/bigquery.py --records 1000000 [--only si1 z3]

Measures, on the same gen_singer.py output and the same local BigQuery server (bqemulator, started by this
script from the virtualenv scripts/bqemulator.sh makes; in memory):
- si1: singer-ingest distributed, 1 `rq worker` (validation on): Parquet load jobs into staging tables, then
  MERGE (keyed streams) or INSERT with the offset in one transaction per batch;
- z3: z3-target-bigquery 0.7.2 (Singer SDK), installed by this script into its own virtualenv under
  ~/.cache/singer-ingest-bench/, with its load-job method (``method: batch_job``, NDJSON load jobs) and
  ``denormalized: true`` (a column per property, as singer-ingest makes). It appends (``upsert: false``): its
  upsert MERGE (``UPDATE SET`` with qualified column names) is refused by the local server, so it is measured
  against singer-ingest with ``load_method: append-only`` (si1-append) as well as singer-ingest's default upsert. It reaches the local server through ``BIGQUERY_EMULATOR_HOST``; as it takes
  credentials only from a service-account key or Google's default credentials, it gets a key made up for the
  run whose token endpoint is a stub in this script (the local server checks no token). It gzips each load's
  NDJSON with the gzip program on PATH, and the local server loads gzipped data as no rows without an error, so
  its PATH starts with a gzip that passes the data through (which spares it the compression).
Prints records/s, the ratio of singer-ingest to the peer, peak RSS, and each table's row count.
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
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import BIN, Sampler, generate_input, timed as timed_run  # noqa: E402

from tests import bqserver  # noqa: E402  (compare puts the project root on the path)

REDIS_URL = os.environ.get("BENCH_BIGQUERY_REDIS_URL", "redis://127.0.0.1:6379/12")
# Its singer-sdk 0.22 imports pkg_resources (through fs), which setuptools 81 dropped.
Z3 = (("z3-target-bigquery==0.7.2", "setuptools<81"), "target-bigquery")
PEER_VENVS = Path.home() / ".cache" / "singer-ingest-bench"
TABLES = ["users", "events", "orders", "wide_metrics"]


def timed(cmd: list[str], data: Path, env: dict, label: str, watch: list[tuple[str, int]] = (),
          log: Path | None = None) -> tuple[float, dict]:
    """Run ``cmd`` on ``data``; its seconds and the peak RSS (KB) of it and of the ``watch`` (label, pid) trees."""
    with Sampler() as sampler:
        for name, pid in watch:
            sampler.watch(name, pid)
        seconds, _, err = timed_run(cmd, data, env, sampler, label)
    if log is not None:
        log.write_text(err)
    return seconds, dict(sampler.peaks)


def server_cpu_seconds() -> float:
    """CPU seconds the local server's process has used so far (user + system, from /proc)."""
    fields = Path(f"/proc/{bqserver.pid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counts(dataset: str) -> dict[str, int]:
    client = bqserver.client()
    out = {}
    for t in TABLES:
        (row,) = client.query(f"SELECT COUNT(*) AS n FROM `{dataset}`.`{t}`").result()
        out[t] = row["n"]
    return out


def run_si1(data: Path, tmp: Path, load_method: str = "upsert") -> dict:
    dataset = f"bench_si1_{uuid.uuid4().hex[:6]}"
    redis.Redis.from_url(REDIS_URL).flushdb()
    config = tmp / "si.json"
    config.write_text(json.dumps({"destination": "bigquery", "bigquery_project": bqserver.PROJECT,
                                  "default_target_schema": dataset, "load_method": load_method}))
    env = {**os.environ, "SINGER_INGEST_BIGQUERY_API_ENDPOINT": bqserver.endpoint()}
    worker = subprocess.Popen([str(BIN / "rq"), "worker", "singer-ingest", "--url", REDIS_URL],
                              stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    time.sleep(1.5)
    try:
        seconds, rss = timed([str(BIN / "singer-ingest"), "--config", str(config), "--redis-url", REDIS_URL], data,
                             env, "feeder", [("worker", worker.pid)])
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    return {"seconds": seconds, "dataset": dataset, "rss": rss}


# -- the peer ----------------------------------------------------------------------------------------------------
class _TokenStub(BaseHTTPRequestHandler):
    """Answers any OAuth token request with a token the local server does not check."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"access_token": "local-server-needs-no-token", "expires_in": 3600,
                           "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def made_up_key(tmp: Path) -> Path:
    """A service-account key for the peer: a fresh RSA key, its token endpoint the local stub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    server = HTTPServer(("127.0.0.1", 0), _TokenStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    path = tmp / "made-up-key.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": bqserver.PROJECT, "private_key_id": "local",
        "private_key": pem, "client_email": f"bench@{bqserver.PROJECT}.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": f"http://127.0.0.1:{server.server_port}/token"}))
    return path


def z3_exe() -> Path:
    venv = PEER_VENVS / "z3"
    exe = venv / "bin" / Z3[1]
    if not exe.exists() or subprocess.run([str(venv / "bin" / "python"), "-c", "import pkg_resources"],
                                          capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *Z3[0]], check=True)
    return exe


def run_z3(data: Path, tmp: Path) -> dict:
    dataset = f"bench_z3_{uuid.uuid4().hex[:6]}"
    bqserver.client().create_dataset(dataset)
    config = tmp / "z3.json"
    config.write_text(json.dumps({"project": bqserver.PROJECT, "dataset": dataset, "location": "US",
                                  "credentials_path": str(made_up_key(tmp)), "method": "batch_job",
                                  "denormalized": True, "upsert": False, "batch_size": 10000}))
    # It gzips each load's NDJSON through the gzip program on PATH when there is one; the local server loads a
    # gzipped payload as no rows (without an error), so a gzip that passes its input through comes first on PATH.
    shim = tmp / "no-gzip"
    shim.mkdir(exist_ok=True)
    (shim / "gzip").write_text("#!/bin/sh\nexec cat\n")
    (shim / "gzip").chmod(0o755)
    env = {**os.environ, "BIGQUERY_EMULATOR_HOST": bqserver.endpoint(), "PATH": f"{shim}:{os.environ['PATH']}"}
    seconds, rss = timed([str(z3_exe()), "--config", str(config)], data, env, "z3", log=tmp / "z3.log")
    return {"seconds": seconds, "dataset": dataset, "rss": rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--only", nargs="*", choices=["si1", "si1-append", "z3"], help="subset of the tools")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="singer-ingest-bench-bq-"))
    data = generate_input(args.records, tmp)
    print(f"local BigQuery server at {bqserver.endpoint()}", file=sys.stderr, flush=True)
    runs = {"si1": ("singer-ingest distributed, 1 worker", run_si1),
            "si1-append": ("singer-ingest 1 worker, append-only",
                           lambda data, tmp: run_si1(data, tmp, "append-only")),
            "z3": ("z3-target-bigquery 0.7.2 (append)", run_z3)}
    results: dict[str, dict] = {}
    for name in args.only or list(runs):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        before = server_cpu_seconds()
        results[name] = {**runs[name][1](data, tmp), "server_cpu": -before}
        results[name]["server_cpu"] += server_cpu_seconds()
    print(f"\ninput: gen_singer.py --records {args.records} (four streams, validation on), destination bigquery "
          f"(bqemulator 1.4.0, local, in memory)\n")
    print(f"{'tool':40s} {'records/s':>12s} {'si1 / tool':>11s}  peak RSS (MB) / row counts")
    ref = results.get("si1")
    appended = set()
    for name, r in results.items():
        rate = args.records / r["seconds"]
        ratio = f"{(args.records / ref['seconds']) / rate:.2f}x" if ref else "-"
        rss = ", ".join(f"{k} {v / 1024:.0f}" for k, v in r["rss"].items())
        rows = counts(r["dataset"])
        if name != "si1":
            appended.add(tuple(sorted(rows.items())))
        print(f"{runs[name][0]:40s} {rate:12,.0f} {ratio:>11s}  {rss}; {r['seconds']:.1f} s, local server CPU "
              f"{r['server_cpu']:.1f} s; rows {rows}")
    # The appending loaders keep every record; singer-ingest's upsert keeps the last record of each order.
    print(f"\nrow counts of the appending loaders agree: {len(appended) <= 1}")
    return 0 if len(appended) <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
