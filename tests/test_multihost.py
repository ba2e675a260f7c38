"""Several hosts for real: workers in their own network namespaces reach Redis and PostgreSQL over a
bridge, not loopback. Faults: a host cut off the network mid-run and brought back.

Layout (all made by the fixture, removed afterwards; needs root, as on the CI machine):

    root namespace: bridge si-br0 10.231.0.1/24, a throwaway Redis on 10.231.0.1:6391,
                    a TCP relay 10.231.0.1:5433 -> 127.0.0.1:5432 (PostgreSQL), the feeder
    si-h1 (10.231.0.11), si-h2 (10.231.0.12): one `rq worker` each
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time

import orjson
import pytest
import redis

from .conftest import BIN, Workers, generate
from .expected import assert_same_rows, expected_rows, model, postgres_rows

pytestmark = pytest.mark.integration

BRIDGE = "si-br0"
GATEWAY = "10.231.0.1"
HOSTS = {"si-h1": "10.231.0.11", "si-h2": "10.231.0.12"}
REDIS_PORT = 6391
PG_RELAY_PORT = 5433
REDIS_URL = f"redis://{GATEWAY}:{REDIS_PORT}/0"
PG_DSN = f"host={GATEWAY} port={PG_RELAY_PORT} user=postgres dbname=test"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _teardown_network() -> None:
    for host in HOSTS:
        subprocess.run(["ip", "netns", "del", host], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{host}-v"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


class Relay:
    """A small TCP relay so processes on the bridge reach the PostgreSQL that listens on loopback."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server(listen, reuse_port=True)
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass  # the other direction closes both sockets
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the other direction

    def close(self) -> None:
        self.stop = True
        self.server.close()


@pytest.fixture(scope="module")
def network():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.fail("multi-host tests need root and iproute2 (ip netns); run them as root, as CI does")
    _teardown_network()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for host, addr in HOSTS.items():
        sh("ip", "netns", "add", host)
        sh("ip", "link", "add", f"{host}-v", "type", "veth", "peer", "name", "eth0", "netns", host)
        sh("ip", "link", "set", f"{host}-v", "master", BRIDGE, "up")
        sh("ip", "netns", "exec", host, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "netns", "exec", host, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", host, "ip", "link", "set", "lo", "up")
    redis_proc = subprocess.Popen(["redis-server", "--bind", GATEWAY, "--port", str(REDIS_PORT), "--save", "",
                                   "--appendonly", "no", "--protected-mode", "no"], stdout=subprocess.DEVNULL)
    relay = Relay((GATEWAY, PG_RELAY_PORT), ("127.0.0.1", 5432))
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(REDIS_URL).ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "the test Redis on the bridge did not start"
            time.sleep(0.1)
    yield
    relay.close()
    redis_proc.terminate()
    redis_proc.wait(timeout=10)
    _teardown_network()


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
        assert "taken by worker" in log, f"{host} owned no stream:\n{host_workers.logs()}"


def test_host_cut_off_mid_run_and_brought_back(host_workers, run_id, tmp_path, pg_schema):
    host_workers.start_on("si-h1")
    host_workers.start_on("si-h2")
    data = generate(60000, "--state-every", "1000")
    (tmp_path / "in.singer").write_bytes(data)
    feeder = subprocess.Popen([str(BIN / "singer-ingest"), "--config", _config(tmp_path, pg_schema, batch_size_rows=1000),
                               "--redis-url", REDIS_URL, "--run-id", run_id, "--input", str(tmp_path / "in.singer")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = feeder.stdout.readline()
    assert first.startswith(b'{"type":"STATE"'), feeder.stderr.read().decode()
    sh("ip", "link", "set", "si-h1-v", "down")       # si-h1 loses the network
    time.sleep(8)                                     # its leases (3 s) expire; si-h2 takes its streams
    sh("ip", "link", "set", "si-h1-v", "up")          # and it comes back, with whatever it had in flight
    out, err = feeder.communicate(timeout=300)
    assert feeder.returncode == 0, err.decode() + host_workers.logs()
    states = [orjson.loads(line)["value"] for line in (first + out).splitlines()]
    assert states[-1] == model(data)["users"]["last_state"]
    _check(pg_schema, data)
    assert host_workers.procs[1].poll() is None
    # si-h1 learned that its streams moved on: its heartbeat found the leases gone, or the destination
    # refused its late commit (fenced).
    log = (tmp_path / "worker-1.log").read_text()
    assert "lease lost" in log or "took this stream over" in log, host_workers.logs()
