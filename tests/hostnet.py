"""Test hosts on one machine: network namespaces on a bridge, a Redis on the bridge and a relay to the
loopback PostgreSQL. Used by the multi-host tests and by bench/chaos.py. Needs root and iproute2.

    root namespace: bridge si-br0 10.231.0.1/24, a throwaway Redis on 10.231.0.1:6391,
                    a TCP relay 10.231.0.1:5433 -> 127.0.0.1:5432 (PostgreSQL), the feeder
    si-h1 (10.231.0.11), si-h2 (10.231.0.12), ...: one `rq worker` each
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import redis

BRIDGE = "si-br0"
GATEWAY = "10.231.0.1"
HOSTS = {f"si-h{i}": f"10.231.0.{10 + i}" for i in range(1, 5)}
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



class HostNetwork:
    """The bridge, the hosts, the Redis and the relay; ``close`` removes them all."""

    def __init__(self, hosts: int = 2):
        self.hosts = list(HOSTS)[:hosts]
        _teardown_network()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for host in self.hosts:
            addr = HOSTS[host]
            sh("ip", "netns", "add", host)
            sh("ip", "link", "add", f"{host}-v", "type", "veth", "peer", "name", "eth0", "netns", host)
            sh("ip", "link", "set", f"{host}-v", "master", BRIDGE, "up")
            sh("ip", "netns", "exec", host, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "netns", "exec", host, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", host, "ip", "link", "set", "lo", "up")
        self.redis = subprocess.Popen(["redis-server", "--bind", GATEWAY, "--port", str(REDIS_PORT), "--save", "",
                                       "--appendonly", "no", "--protected-mode", "no"], stdout=subprocess.DEVNULL)
        self.relay = Relay((GATEWAY, PG_RELAY_PORT), ("127.0.0.1", 5432))
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(REDIS_URL).ping()
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
        self.redis.terminate()
        self.redis.wait(timeout=10)
        _teardown_network()
