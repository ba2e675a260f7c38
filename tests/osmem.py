"""A local OpenSearch-compatible server (osmem-server, in-memory) for the elasticsearch destination's tests:
started once per test process on a free loopback port, as a process of its own, stopped when the tests end
(``-parent-pid`` makes it exit with the test process even when that is killed)."""

from __future__ import annotations

import os
import threading

import orjson
import urllib3

from . import localserver

_lock = threading.Lock()
_url: str | None = None


def url() -> str:
    """The server's URL, starting it on first use."""
    global _url
    with _lock:
        if _url is None:
            from osmem_server import resolve_binary

            port = localserver.free_port()
            localserver.start([resolve_binary(), "-addr", f"127.0.0.1:{port}", "-no-stdin-watch", "-parent-pid",
                               str(os.getpid())], port, "osmem-server",
                              hint="install the test extra (pip install -e '.[test]'), which brings osmem-server")
            _url = f"http://127.0.0.1:{port}"
        return _url


_pool = urllib3.PoolManager(retries=False)


def request(method: str, path: str, body=None):
    """(status, parsed JSON) of one request to the test server."""
    resp = _pool.request(method, url() + path, body=None if body is None else orjson.dumps(body),
                         headers={"Content-Type": "application/json"}, timeout=60)
    return resp.status, (orjson.loads(resp.data) if resp.data else {})
