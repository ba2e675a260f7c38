"""The distributed mode: the real CLI, the real Redis, real `rq worker` processes, DuckDB checked row by row."""

from __future__ import annotations

import json
import subprocess
import time

import orjson
import pytest

from .conftest import BIN, ROOT, finish, first_state, generate, start_feeder
from .expected import assert_same_rows, duckdb_rows, expected_rows, model

pytestmark = pytest.mark.integration


def _config(tmp_path, **extra) -> str:
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"duckdb_path": str(tmp_path / "out.duckdb"), "lease_ttl_seconds": 3, **extra}))
    return str(path)


def _check_destination(tmp_path, data: bytes) -> None:
    for name, stream in model(data).items():
        assert_same_rows(duckdb_rows(str(tmp_path / "out.duckdb"), name, stream), expected_rows(stream),
                         stream["keys"], name)


def test_two_workers_share_a_run_and_load_it_exactly(cli, workers, redis_url, run_id, tmp_path):
    workers.start(2)
    data = generate(20000)
    result = cli(["--config", _config(tmp_path, batch_size_rows=2000), "--redis-url", redis_url,
                  "--run-id", run_id], input_bytes=data)
    assert result.returncode == 0, result.stderr + workers.logs()
    assert result.states, "no STATE printed"
    assert result.states[-1] == model(data)["users"]["last_state"]
    _check_destination(tmp_path, data)
    logs = workers.logs()
    # Both worker processes took part: each ran a job of this run and joined it.
    for i in (1, 2):
        text = (tmp_path / f"worker-{i}.log").read_text()
        assert f"singer-ingest run {run_id}" in text, f"worker {i} got no job of the run:\n{logs}"
        assert "joined on host" in text, f"worker {i} did not join the run:\n{logs}"
    # The committed STATE stays readable in Redis after the run.
    state = cli(["state", "--run-id", run_id, "--redis-url", redis_url])
    assert state.returncode == 0, state.stderr
    assert state.states == [result.states[-1]]
    bare = cli(["state", "--run-id", run_id, "--redis-url", redis_url, "--value"])
    assert orjson.loads(bare.stdout) == result.states[-1]


def test_env_redis_url_and_summary(cli, workers, redis_url, run_id, tmp_path):
    workers.start(1)
    data = generate(2000)
    result = cli(["--config", _config(tmp_path), "--run-id", run_id], input_bytes=data,
                 env={"SINGER_INGEST_REDIS_URL": redis_url})
    assert result.returncode == 0, result.stderr + workers.logs()
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"singer-ingest: run {run_id} done in ")
    for name, stream in model(data).items():
        assert f"{name}: {len(stream['rows'])}" in summary
    _check_destination(tmp_path, data)


def test_worker_killed_mid_run_is_taken_over_exactly(workers, redis_url, run_id, tmp_path):
    victim, survivor = workers.start(2)
    data = generate(40000)
    (tmp_path / "in.singer").write_bytes(data)
    feeder = start_feeder(["--config", _config(tmp_path, batch_size_rows=1000),
                               "--redis-url", redis_url, "--run-id", run_id, "--input", str(tmp_path / "in.singer")])
    first = first_state(feeder)
    workers.kill(victim)
    states, err = finish(feeder, first, timeout=240)
    assert feeder.returncode == 0, err + workers.logs()
    assert states[-1] == model(data)["users"]["last_state"]
    _check_destination(tmp_path, data)
    assert survivor.poll() is None


def test_worker_error_reaches_the_feeder_and_workers_stay_healthy(cli, workers, redis_url, run_id, tmp_path):
    workers.start(2)
    data = generate(3000).splitlines()
    bad_line = 1500
    bad = orjson.loads(data[bad_line - 1])
    assert bad["type"] == "RECORD"
    key = {"users": "id", "orders": "order_id", "wide_metrics": "id", "events": "event_id"}[bad["stream"]]
    bad["record"][key] = ["not", "a", "scalar"]
    data[bad_line - 1] = orjson.dumps(bad)
    result = cli(["--config", _config(tmp_path), "--redis-url", redis_url, "--run-id", run_id],
                 input_bytes=b"\n".join(data) + b"\n")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("singer-ingest: error:"), result.stderr
    assert f"input line {bad_line}" in last and repr(bad["stream"]) in last, last
    assert "Traceback" not in result.stderr
    # The same workers load the next run.
    good = generate(1000)
    again = cli(["--config", _config(tmp_path), "--redis-url", redis_url, "--run-id", run_id + "b"],
                input_bytes=good)
    assert again.returncode == 0, again.stderr + workers.logs()
    assert all(p.poll() is None for p in workers.procs)


def test_two_runs_at_once(workers, redis_url, run_id, tmp_path):
    workers.start(4)
    procs = []
    inputs = []
    for n, records in ((1, 6000), (2, 5000)):
        d = tmp_path / f"run{n}"
        d.mkdir()
        data = generate(records, "--seed", str(n))
        (d / "in.singer").write_bytes(data)
        inputs.append((d, data))
        procs.append(subprocess.Popen(
            [str(BIN / "singer-ingest"), "--config", _config(d, max_workers_per_run=2), "--redis-url", redis_url,
             "--run-id", f"{run_id}-{n}", "--input", str(d / "in.singer")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc, (d, data) in zip(procs, inputs):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode() + workers.logs()
        assert orjson.loads(out.splitlines()[-1])["value"] == model(data)["users"]["last_state"]
        _check_destination(d, data)


def test_redis_unreachable_is_a_clear_error(cli, tmp_path):
    result = cli(["--config", _config(tmp_path), "--redis-url", "redis://127.0.0.1:1/0"], input_bytes=b"")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("singer-ingest: error: cannot reach Redis")
    assert "Traceback" not in result.stderr


def test_run_id_in_use_is_refused(cli, workers, redis_url, run_id, tmp_path):
    workers.start(1)
    data = generate(500)
    first = cli(["--config", _config(tmp_path), "--redis-url", redis_url, "--run-id", run_id], input_bytes=data)
    assert first.returncode == 0, first.stderr
    again = cli(["--config", _config(tmp_path), "--redis-url", redis_url, "--run-id", run_id], input_bytes=data)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    # The first run's committed STATE is untouched by the refused one.
    state = cli(["state", "--run-id", run_id, "--redis-url", redis_url])
    assert state.states == [first.states[-1]]


def test_age_flush_on_the_clock_distributed(workers, redis_url, run_id, tmp_path):
    """A STATE becomes safe by the age trigger while the tap is quiet (stdin stays open)."""
    workers.start(1)
    feeder = subprocess.Popen([str(BIN / "singer-ingest"), "--config", _config(tmp_path, max_record_age_seconds=1),
                               "--redis-url", redis_url, "--run-id", run_id],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = [
        {"type": "SCHEMA", "stream": "s", "schema": {"properties": {"id": {"type": "integer"}}}, "key_properties": ["id"]},
        {"type": "RECORD", "stream": "s", "record": {"id": 1}},
        {"type": "STATE", "value": {"at": 1}},
    ]
    feeder.stdin.write(b"".join(orjson.dumps(m) + b"\n" for m in lines))
    feeder.stdin.flush()
    start = time.monotonic()
    line = feeder.stdout.readline()
    waited = time.monotonic() - start
    assert orjson.loads(line) == {"type": "STATE", "value": {"at": 1}}
    assert waited < 20
    feeder.stdin.close()
    assert feeder.wait(timeout=60) == 0, feeder.stderr.read().decode()


def test_backpressure_small_backlog_still_loads_exactly(workers, redis_url, run_id, tmp_path, fresh_redis):
    """With a backlog bound far below one batch, the feeder waits and the workers flush on its request."""
    workers.start(1)
    data = generate(20000)
    (tmp_path / "in.singer").write_bytes(data)
    feeder = subprocess.Popen([str(BIN / "singer-ingest"), "--config", _config(tmp_path, max_backlog_bytes=300_000),
                               "--redis-url", redis_url, "--run-id", run_id, "--input", str(tmp_path / "in.singer")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    keys = [f"si:{{{run_id}}}:data:{sid}" for sid in range(4)]
    peak = 0
    while feeder.poll() is None:
        lengths = [fresh_redis.xlen(k) for k in keys]
        peak = max(peak, sum(lengths))
        time.sleep(0.02)
    out, err = feeder.communicate()
    assert feeder.returncode == 0, err.decode() + workers.logs()
    assert orjson.loads(out.splitlines()[-1])["value"] == model(data)["users"]["last_state"]
    _check_destination(tmp_path, data)
    # 300 kB of input is about 2 chunks of 500 lines; acknowledged entries are trimmed, so the streams
    # never hold more than a few chunks (the whole input is 40 chunks).
    assert 0 < peak <= 12, peak


def _restart_redis() -> None:
    import redis as redis_lib

    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save",
                    "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"],
                   check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            redis_lib.Redis(host="127.0.0.1", port=6379).ping()
            return
        except redis_lib.RedisError:
            assert time.monotonic() < deadline, "Redis did not come back"
            time.sleep(0.1)


def test_redis_restart_loses_the_run_clearly_and_the_last_state_is_safe(workers, redis_url, run_id, tmp_path):
    workers.start(2)
    data = generate(150000, "--state-every", "2000")
    (tmp_path / "in.singer").write_bytes(data)
    feeder = start_feeder(["--config", _config(tmp_path, batch_size_rows=2000),
                               "--redis-url", redis_url, "--run-id", run_id, "--input", str(tmp_path / "in.singer")])
    first = first_state(feeder)
    _restart_redis()
    out, err = feeder.communicate(timeout=120)
    assert feeder.returncode == 1, err.decode()
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("singer-ingest: error:") and "resume" in last, last
    assert "Traceback" not in err.decode()
    states = [orjson.loads(line)["value"] for line in (first + out).splitlines()]
    # Everything before the last printed STATE is in the destination.
    lines = data.splitlines()
    cut = max(i for i, raw in enumerate(lines) if raw.startswith(b'{"type":"STATE"')
              and orjson.loads(raw)["value"] == states[-1])
    prefix = model(b"\n".join(lines[:cut]))
    workers.stop()  # a worker may still be finishing a batch it had read before Redis went away
    for name, stream in prefix.items():
        loaded = duckdb_rows(str(tmp_path / "out.duckdb"), name, stream)
        if stream["keys"]:
            have = {tuple(r[k] for k in stream["keys"]) for r in loaded}
            want = {tuple(r[k] for k in stream["keys"]) for r in expected_rows(stream)}
            assert want <= have, name
        else:
            assert len(loaded) >= len(stream["rows"]), name


def test_every_worker_killed_then_new_ones_finish_the_run(workers, redis_url, run_id, tmp_path):
    """With max_workers_per_run=2 no spare job waits in the queue: the feeder must enqueue new work."""
    first_two = workers.start(2)
    data = generate(100000, "--state-every", "1000")
    (tmp_path / "in.singer").write_bytes(data)
    feeder = start_feeder(["--config",
                               _config(tmp_path, batch_size_rows=500, max_record_age_seconds=0.5,
                                       max_workers_per_run=2),
                               "--redis-url", redis_url, "--run-id", run_id, "--input", str(tmp_path / "in.singer")])
    first = first_state(feeder)
    for proc in first_two:
        workers.kill(proc)
    time.sleep(15)  # well past the feeder's grace (lease TTL to notice, then 2 lease TTLs) with no worker
    assert feeder.poll() is None
    workers.start(2)
    states, err = finish(feeder, first, timeout=240)
    assert feeder.returncode == 0, err + workers.logs()
    assert "enqueueing another job" in err
    assert states[-1] == model(data)["users"]["last_state"]
    _check_destination(tmp_path, data)


def test_status_shows_runs_streams_and_state(cli, workers, redis_url, run_id, tmp_path):
    workers.start(1)
    data = (ROOT / "examples" / "shop.singer").read_bytes()
    assert cli(["--config", _config(tmp_path), "--redis-url", redis_url, "--run-id", run_id],
               input_bytes=data).returncode == 0
    result = cli(["status", "--redis-url", redis_url, "--run-id", run_id, "--json"])
    assert result.returncode == 0, result.stderr
    status = orjson.loads(result.stdout)
    expected = model(data)
    assert status["status"] == "done" and status["error"] is None and status["backlog_bytes"] == 0
    assert {s["stream"]: s["rows_committed"] for s in status["streams"]} == \
        {name: len(s["rows"]) for name, s in expected.items()}
    assert status["last_committed_state"] == expected["orders"]["last_state"]
    text = cli(["status", "--redis-url", redis_url]).stdout.decode()
    assert f"run {run_id}: done" in text and "last committed STATE" in text
    missing = cli(["status", "--redis-url", redis_url, "--run-id", "nope"])
    assert missing.returncode == 1 and "no run 'nope'" in missing.stderr


def test_a_worker_whose_lease_is_gone_reads_nothing_and_the_new_owner_gets_every_entry_in_order(fresh_redis):
    from ingest import wire
    from ingest.wire import RunKeys
    from workers.leases import Leases

    keys = RunKeys("lease-read")
    data = keys.data(0)
    fresh_redis.xgroup_create(data, wire.GROUP, id="0", mkstream=True)
    ids = [fresh_redis.xadd(data, {"n": str(i)}) for i in range(5)]
    a, b = Leases(fresh_redis, keys, "A", 30), Leases(fresh_redis, keys, "B", 30)
    lease_a = a.try_claim(0)
    assert [e for e, _ in a.read(wire.GROUP, [(lease_a, data, b">")], 2)[0]] == ids[:2]
    fresh_redis.delete(keys.lease(0))  # A's lease expired; A has not noticed yet
    lease_b = b.try_claim(0)
    assert lease_b is not None and lease_b.fence > lease_a.fence
    # A reads again before its heartbeat tells it: the script refuses, no entry goes to A's pending list.
    assert a.read(wire.GROUP, [(lease_a, data, b">")], 10) == [None]
    # B claims what A had read, re-reads it, then the rest: every entry once, in order.
    fresh_redis.xautoclaim(data, wire.GROUP, "B", 0, start_id="0-0")
    pending = b.read(wire.GROUP, [(lease_b, data, b"0")], 10)[0]
    rest = b.read(wire.GROUP, [(lease_b, data, b">")], 10)[0]
    assert [e for e, _ in pending + rest] == ids
    assert [f[b"n"] for _, f in pending + rest] == [str(i).encode() for i in range(5)]


def test_undeclared_properties_warned_by_the_worker_and_counted_in_the_feeders_summary(cli, workers, redis_url,
                                                                                        run_id, tmp_path):
    from .test_cli_embedded import _with_undeclared

    workers.start(2)
    data, n, first = _with_undeclared(8000)
    result = cli(["--config", _config(tmp_path, batch_size_rows=1000), "--redis-url", redis_url, "--run-id", run_id],
                 input_bytes=data)
    assert result.returncode == 0, result.stderr + workers.logs()
    _check_destination(tmp_path, data)
    logs = workers.logs()
    assert f"run {run_id}: stream 'events': input line {first}: property 'zz_extra' is not declared" in logs, logs
    assert "property 'yy' is not declared" in logs  # (again by a worker the stream moves to, if it re-reads it)
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.endswith(f"not loaded: events: {n} (properties zz_extra, yy)"), summary
    status = orjson.loads(cli(["status", "--redis-url", redis_url, "--run-id", run_id, "--json"]).stdout)
    by_stream = {s["stream"]: s for s in status["streams"]}
    assert by_stream["events"]["records_with_undeclared_properties"] == n
    assert by_stream["events"]["undeclared_properties"] == ["zz_extra", "yy"]
    assert by_stream["users"]["records_with_undeclared_properties"] == 0


def test_undeclared_properties_set_to_error_fail_the_distributed_run_at_the_line(cli, workers, redis_url, run_id,
                                                                                  tmp_path):
    from .test_cli_embedded import _with_undeclared

    workers.start(1)
    data, _, first = _with_undeclared(8000)
    result = cli(["--config", _config(tmp_path, batch_size_rows=500, undeclared_properties="error"),
                  "--redis-url", redis_url, "--run-id", run_id], input_bytes=data)
    assert result.returncode == 1, result.stderr
    expected = f"input line {first}, stream 'events': record has properties its schema does not declare: 'zz_extra'"
    assert expected in result.stderr.strip().splitlines()[-1], result.stderr
    assert expected in workers.logs()
    lines = data.splitlines()
    before = [orjson.loads(lines[i])["value"] for i in range(first - 1) if b'"STATE"' in lines[i]]
    assert all(s in before for s in result.states)


def test_a_schema_without_properties_fails_the_distributed_run(cli, workers, redis_url, run_id, tmp_path):
    workers.start(1)
    data = generate(3000).splitlines()
    at = len(data) // 2
    data[at:at] = [orjson.dumps({"type": "SCHEMA", "stream": "bare", "schema": {"type": "object"},
                                 "key_properties": []}),
                   orjson.dumps({"type": "RECORD", "stream": "bare", "record": {"a": 1}})]
    line = at + 1  # the SCHEMA's input line
    result = cli(["--config", _config(tmp_path), "--redis-url", redis_url, "--run-id", run_id],
                 input_bytes=b"\n".join(data) + b"\n")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert f"input line {line}, stream 'bare': SCHEMA has no \"properties\"" in last, last
    before = [orjson.loads(data[i])["value"] for i in range(line - 1) if b'"STATE"' in data[i]]
    assert all(s in before for s in result.states)
    status = orjson.loads(cli(["status", "--redis-url", redis_url, "--run-id", run_id, "--json"]).stdout)
    assert status["status"] == "failed" and 'SCHEMA has no "properties"' in status["error"]


def test_a_mistyped_subcommand_starts_no_run(cli, fresh_redis, redis_url, tmp_path):
    result = cli(["--redis-url", redis_url, "--config", _config(tmp_path), "stauts"], input_bytes=generate(100))
    assert result.returncode == 2
    assert "'stauts' is not a subcommand; the subcommands are state, status" in result.stderr
    from ingest import wire

    assert fresh_redis.zcard(wire.RUNS) == 0 and not fresh_redis.keys("rq:queue:*")
