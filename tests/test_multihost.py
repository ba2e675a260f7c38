"""Several hosts for real: workers in their own network namespaces (tests/hostnet.py) reach Redis and
PostgreSQL over a bridge, not loopback. Faults: a host cut off the network mid-run and brought back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import redis

from .conftest import finish, first_state, start_feeder, Workers, generate
from .destinations import HARNESSES
from .expected import assert_same_rows, expected_rows, model, postgres_rows
from .hostnet import PG_DSN, REDIS_URL, HostNetwork
from .test_conformance import assert_matches_input

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def network():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.fail("multi-host tests need root and iproute2 (ip netns); run them as root, as CI does")
    net = HostNetwork(hosts=2)
    yield net
    net.close()


class HostWorkers(Workers):
    def start_on(self, host: str):
        self.prefix = ["ip", "netns", "exec", host]
        return self.start(1)[0]


@pytest.fixture()
def host_workers(network, tmp_path):
    redis.Redis.from_url(REDIS_URL).flushdb()
    w = HostWorkers(REDIS_URL, tmp_path, env={"SINGER_INGEST_POSTGRES_DSN": PG_DSN})
    yield w
    w.stop()


def _config(tmp_path, schema: str, **extra) -> str:
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"destination": "postgres", "default_target_schema": schema, "lease_ttl_seconds": 3,
                                **extra}))
    return str(path)


def _check(schema: str, data: bytes) -> None:
    for name, stream in model(data).items():
        assert_same_rows(postgres_rows(PG_DSN, schema, name, stream), expected_rows(stream), stream["keys"], name)


@pytest.mark.postgres
def test_workers_on_two_hosts_load_one_run(cli, host_workers, run_id, tmp_path, pg_schema):
    host_workers.start_on("si-h1")
    host_workers.start_on("si-h2")
    data = generate(20000)
    result = cli(["--config", _config(tmp_path, pg_schema, batch_size_rows=2000), "--redis-url", REDIS_URL,
                  "--run-id", run_id], input_bytes=data)
    assert result.returncode == 0, result.stderr + host_workers.logs()
    assert result.states[-1] == model(data)["users"]["last_state"]
    _check(pg_schema, data)
    for i, host in ((1, "si-h1"), (2, "si-h2")):
        log = (tmp_path / f"worker-{i}.log").read_text()
        assert f"run {run_id}: worker" in log and "joined on host" in log, f"{host} did not join:\n{host_workers.logs()}"


def _cut_off_mid_run_and_brought_back(host_workers, run_id, tmp_path, config: str) -> bytes:
    """si-h1 loads alone, is cut off the network while si-h2 takes its streams over, and comes back with
    whatever it had in flight; the run must finish exactly. Returns the input."""
    host_workers.start_on("si-h1")
    data = generate(60000, "--state-every", "1000")
    # The input goes through a pipe left open until si-h1 is back, so the run is still on when it returns.
    feeder = start_feeder(["--config", config, "--redis-url", REDIS_URL, "--run-id", run_id], stdin=subprocess.PIPE)
    feeder.stdin.write(data)
    feeder.stdin.flush()
    first = first_state(feeder)    # si-h1, alone so far, owns the streams and has committed
    host_workers.start_on("si-h2")
    HostNetwork.cut("si-h1")       # si-h1 loses the network
    assert "taken by worker" in (tmp_path / "worker-1.log").read_text()
    time.sleep(8)                  # its leases (3 s) expire; si-h2 takes its streams
    HostNetwork.restore("si-h1")   # and it comes back, with whatever it had in flight
    # The run stays open until si-h1 learned that its streams moved on: its heartbeat found the leases
    # gone, the destination refused its late commit (fenced), or, its job ended by a Redis error while the
    # route came back, it found other workers holding its leases as it left.
    log = tmp_path / "worker-1.log"
    deadline = time.monotonic() + 60
    while not any(s in log.read_text() for s in ("lease lost", "took this stream over",
                                                   "another worker holds its lease now")):
        assert time.monotonic() < deadline, "si-h1 never learned its streams moved on:\n" + host_workers.logs()
        time.sleep(0.2)
    states, err = finish(feeder, first, timeout=300)
    assert feeder.returncode == 0, err + host_workers.logs()
    assert states[-1] == model(data)["users"]["last_state"]
    assert host_workers.procs[1].poll() is None
    return data


@pytest.mark.postgres
def test_host_cut_off_mid_run_and_brought_back(host_workers, run_id, tmp_path, pg_schema):
    data = _cut_off_mid_run_and_brought_back(host_workers, run_id, tmp_path,
                                             _config(tmp_path, pg_schema, batch_size_rows=1000))
    _check(pg_schema, data)


@pytest.mark.delta
def test_host_cut_off_mid_run_and_brought_back_into_delta(host_workers, run_id, tmp_path):
    """The same on Delta tables in a folder both hosts reach: the cut-off owner's late commit is refused by the
    table's own log (its fencing token is behind the one the new owner committed)."""
    lake = HARNESSES["delta"](tmp_path)
    data = _cut_off_mid_run_and_brought_back(host_workers, run_id, tmp_path,
                                             lake.write_config(batch_size_rows=1000, lease_ttl_seconds=3))
    assert_matches_input(lake, data)
