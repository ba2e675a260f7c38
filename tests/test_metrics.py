"""Prometheus metrics of a real `rq worker`, scraped over HTTP while it loads a run."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ingest.wire import RunKeys

from .conftest import finish, generate, start_feeder
from .test_conformance import with_bad_events

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _by_stream(samples, name: str, run_id: str) -> dict[str, float]:
    return {dict(labels)["stream"]: v for (n, labels), v in samples.items()
            if n == name and dict(labels).get("run") == run_id}


def test_worker_serves_rows_bytes_latency_backlog_and_claims(workers, redis_url, run_id, tmp_path):
    port = _free_port()
    workers.env.update(SINGER_INGEST_METRICS_PORT=str(port), SINGER_INGEST_METRICS_ADDRESS="127.0.0.1",
                       SINGER_INGEST_LOG_FORMAT="json")
    workers.start(1)
    config = tmp_path / "target.json"
    config.write_text(json.dumps({"duckdb_path": str(tmp_path / "out.duckdb"), "max_record_age_seconds": 0.5,
                                  "batch_size_rows": 3000, "bad_records": "dead_letter"}))
    data, _, bad = with_bad_events(generate(20000))
    feeder = start_feeder(["--config", str(config), "--redis-url", redis_url, "--run-id", run_id, "--quiet"],
                          stdin=subprocess.PIPE)
    # Everything but the end of input: the run stays open, the worker loads what it was sent.
    feeder.stdin.write(data)
    feeder.stdin.flush()
    conn = redis.Redis.from_url(redis_url)
    keys = RunKeys(run_id)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the worker did not load the input: " + workers.logs()
        sent, committed = conn.hgetall(keys.sent), conn.hgetall(keys.committed)
        try:
            samples = _scrape(port)
        except (urllib.error.URLError, ConnectionError):
            samples = None
        if sent and samples is not None and all(committed.get(sid) == seq for sid, seq in sent.items()):
            names = {int(v): k.decode() for k, v in conn.hgetall(keys.streams).items()}
            rows = {names[int(sid)]: float(n) for sid, n in conn.hgetall(keys.rows).items()}
            loaded = _by_stream(samples, "singer_ingest_rows_loaded_total", run_id)
            backlog = samples.get(("singer_ingest_backlog_bytes", (("run", run_id),)))
            if loaded == rows and backlog == 0:
                break
        time.sleep(0.3)
    assert set(loaded) == {"users", "events", "orders", "wide_metrics"}
    assert all(n > 0 for n in loaded.values())
    nbytes = _by_stream(samples, "singer_ingest_bytes_loaded_total", run_id)
    assert set(nbytes) == set(loaded) and all(b > 30 * loaded[s] for s, b in nbytes.items()), nbytes
    drains = {dict(labels)["stream"]: v for (n, labels), v in samples.items()
              if n == "singer_ingest_batch_drain_seconds_count"}
    assert set(drains) == set(loaded) and all(v >= 1 for v in drains.values())
    claims = {(dict(labels)["stream"], dict(labels)["kind"]): v for (n, labels), v in samples.items()
              if n == "singer_ingest_stream_claims_total" and dict(labels)["run"] == run_id}
    assert claims == {(s, "new"): 1.0 for s in loaded}
    assert samples[("singer_ingest_streams_owned", (("run", run_id),))] == 4
    assert _by_stream(samples, "singer_ingest_dead_letters_total", run_id) == {"events": float(len(bad))} and bad
    states, err = finish(feeder)
    assert feeder.returncode == 0, err + workers.logs()
    assert err == "", "--quiet prints nothing on success"
    # The run is over: the work horse that served it exited, and its port with it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            _scrape(port)
        except (urllib.error.URLError, ConnectionError):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the metrics port stayed open after the run ended")
    # SINGER_INGEST_LOG_FORMAT=json: the worker's own log records are JSON objects (rq's lines stay as rq writes them).
    ours = [json.loads(line) for line in workers.logs().splitlines() if line.startswith("{")]
    assert any(r["logger"] == "workers.runner" and "joined" in r["message"] for r in ours), workers.logs()
    assert any("serving Prometheus metrics" in r["message"] for r in ours)
