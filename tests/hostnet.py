"""Test hosts on one machine: network namespaces on a bridge, a Redis on the bridge and relays to the
loopback PostgreSQL and MySQL/MariaDB. Used by the multi-host tests and by bench/chaos.py. Needs root and iproute2.

    root namespace: bridge si-br0 10.231.0.1/24, a throwaway Redis on 10.231.0.1:6391,
                    TCP relays 10.231.0.1:5433 -> 127.0.0.1:5432 (PostgreSQL) and
                    10.231.0.1:3307 -> 127.0.0.1:3306 (MySQL/MariaDB), the feeder
    si-h1 (10.231.0.11), si-h2 (10.231.0.12), ...: one `rq worker` each

The servers keep listening on loopback only: their clients on the bridge come through a relay, so the servers
see them as local clients (MariaDB's root@127.0.0.1, PostgreSQL's trust for 127.0.0.1), and no server's
configuration or grants change. Network 0 is the one above; network N (``HostNetwork(index=N)``) has its own
names and addresses (bridge siN-br0, hosts siN-h1, ..., 10.(231+N).0.0/24), so a chaos run and the multi-host
tests can run side by side on one machine.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import redis

REDIS_PORT = 6391
PG_RELAY_PORT = 5433
MYSQL_RELAY_PORT = 3307


def layout(index: int = 0) -> tuple[str, str, dict[str, str]]:
    """Network ``index``'s bridge, gateway address and hosts (name -> address)."""
    prefix = "si" if index == 0 else f"si{index}"
    net = f"10.{231 + index}.0"
    return f"{prefix}-br0", f"{net}.1", {f"{prefix}-h{i}": f"{net}.{10 + i}" for i in range(1, 5)}


def redis_url(gateway: str) -> str:
    return f"redis://{gateway}:{REDIS_PORT}/0"


def pg_dsn(gateway: str) -> str:
    return f"host={gateway} port={PG_RELAY_PORT} user=postgres dbname=test"


def mysql_url(gateway: str) -> str:
    return f"mysql://root@{gateway}:{MYSQL_RELAY_PORT}/"


BRIDGE, GATEWAY, HOSTS = layout(0)
REDIS_URL = redis_url(GATEWAY)
PG_DSN = pg_dsn(GATEWAY)
MYSQL_URL = mysql_url(GATEWAY)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _teardown_network(index: int = 0) -> None:
    bridge, _, hosts = layout(index)
    for host in hosts:
        subprocess.run(["ip", "netns", "del", host], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{host}-v"], capture_output=True)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)


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



class HostNetwork:
    """The bridge, the hosts, the Redis and the relays; ``close`` removes them all."""

    def __init__(self, hosts: int = 2, index: int = 0):
        self.index = index
        bridge, gateway, all_hosts = layout(index)
        self.hosts = list(all_hosts)[:hosts]
        self.redis_url, self.pg_dsn, self.mysql_url = redis_url(gateway), pg_dsn(gateway), mysql_url(gateway)
        _teardown_network(index)
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{gateway}/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        for host in self.hosts:
            addr = all_hosts[host]
            sh("ip", "netns", "add", host)
            sh("ip", "link", "add", f"{host}-v", "type", "veth", "peer", "name", "eth0", "netns", host)
            sh("ip", "link", "set", f"{host}-v", "master", bridge, "up")
            sh("ip", "netns", "exec", host, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "netns", "exec", host, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", host, "ip", "link", "set", "lo", "up")
        self.redis = subprocess.Popen(["redis-server", "--bind", gateway, "--port", str(REDIS_PORT), "--save", "",
                                       "--appendonly", "no", "--protected-mode", "no"], stdout=subprocess.DEVNULL)
        self.relay = Relay((gateway, PG_RELAY_PORT), ("127.0.0.1", 5432))
        self.mysql_relay = Relay((gateway, MYSQL_RELAY_PORT), ("127.0.0.1", 3306))
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.redis_url).ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the test Redis on the bridge did not start") from None
                time.sleep(0.1)

    @staticmethod
    def cut(host: str) -> None:
        sh("ip", "link", "set", f"{host}-v", "down")

    @staticmethod
    def restore(host: str) -> None:
        sh("ip", "link", "set", f"{host}-v", "up")

    def close(self) -> None:
        self.relay.close()
        self.mysql_relay.close()
        self.redis.terminate()
        self.redis.wait(timeout=10)
        _teardown_network(self.index)
