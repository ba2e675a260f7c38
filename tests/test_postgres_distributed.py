"""PostgreSQL end to end: the real CLI, real `rq worker` processes, the real server, checked row by row."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from .conftest import finish, first_state, start_feeder, PG_DSN, generate
from .expected import assert_same_rows, expected_rows, model, postgres_rows

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture()
def pg_workers(workers):
    workers.env["SINGER_INGEST_POSTGRES_DSN"] = PG_DSN
    return workers


def _config(tmp_path, schema: str, **extra) -> str:
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"destination": "postgres", "default_target_schema": schema,
                                "lease_ttl_seconds": 3, **extra}))
    return str(path)


def _check(schema: str, data: bytes) -> None:
    for name, stream in model(data).items():
        assert_same_rows(postgres_rows(PG_DSN, schema, name, stream), expected_rows(stream), stream["keys"], name)


def test_two_workers_load_generated_data_into_postgres_exactly(cli, pg_workers, redis_url, run_id, tmp_path,
                                                                pg_schema):
    pg_workers.start(2)
    data = generate(30000)
    result = cli(["--config", _config(tmp_path, pg_schema, batch_size_rows=3000), "--redis-url", redis_url,
                  "--run-id", run_id], input_bytes=data)
    assert result.returncode == 0, result.stderr + pg_workers.logs()
    assert result.states[-1] == model(data)["users"]["last_state"]
    _check(pg_schema, data)
    # The summary counts the rows each stream wrote: every record of a keyless stream; at least one row per
    # key of a keyed one (a key updated in several batches is written by each), and no more than its records.
    summary = result.stderr.strip().splitlines()[-1]
    written = {name: int(n) for name, n in re.findall(r"(\w+): (\d+)", summary.split("rows/s); ", 1)[1])}
    for name, stream in model(data).items():
        records = data.count(b'"type":"RECORD","stream":"%s"' % name.encode())
        if stream["keys"]:
            assert len(stream["rows"]) <= written[name] <= records, (name, summary)
        else:
            assert written[name] == len(stream["rows"]) == records, (name, summary)
    # Credentials came from the workers' environment: nothing in Redis names the server or user.
    import redis as redis_lib

    conn = redis_lib.Redis.from_url(redis_url)
    for key in conn.scan_iter(f"si:{{{run_id}}}:*"):
        if conn.type(key) == b"hash":
            blob = b" ".join(v for kv in conn.hgetall(key).items() for v in kv)
        elif conn.type(key) == b"string":
            blob = conn.get(key)
        else:
            continue
        assert b"127.0.0.1" not in blob and b"user=postgres" not in blob, key


def test_postgres_restarted_mid_run_nothing_lost_or_doubled(pg_workers, redis_url, run_id, tmp_path, pg_schema):
    pg_workers.start(2)
    data = generate(100000, "--state-every", "1000")
    lines = data.splitlines(keepends=True)
    feeder = start_feeder(["--config", _config(tmp_path, pg_schema, batch_size_rows=2000),
                           "--redis-url", redis_url, "--run-id", run_id], stdin=subprocess.PIPE)
    # The second half of the input goes in after the restart: the run is mid-way however fast it loads.
    feeder.stdin.write(b"".join(lines[:len(lines) // 2]))
    feeder.stdin.flush()
    first = first_state(feeder)
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "immediate"],
                   check=True, capture_output=True)
    states, err = finish(feeder, first, timeout=300, rest=b"".join(lines[len(lines) // 2:]))
    assert feeder.returncode == 0, err + pg_workers.logs()
    assert states[-1] == model(data)["users"]["last_state"]
    _check(pg_schema, data)
    assert "transient destination error" in pg_workers.logs()
