"""A local OpenSearch-compatible server (osmem-server, in-memory) for the elasticsearch destination's tests:
started once per test process on a free loopback port, as a process of its own, stopped when the tests end
(``-parent-pid`` makes it exit with the test process even when that is killed)."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import threading
import time

import orjson
import urllib3

_lock = threading.Lock()
_url: str | None = None


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def url() -> str:
    """The server's URL, starting it on first use."""
    global _url
    with _lock:
        if _url is None:
            from osmem_server import resolve_binary

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = subprocess.Popen([resolve_binary(), "-addr", f"127.0.0.1:{port}", "-no-stdin-watch",
                                     "-parent-pid", str(os.getpid())], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            atexit.register(_stop, proc)
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"osmem-server did not start on 127.0.0.1:{port}; install the test "
                                           f"extra (pip install -e '.[test]'), which brings osmem-server") from None
                    time.sleep(0.05)
            _url = f"http://127.0.0.1:{port}"
        return _url


_pool = urllib3.PoolManager(retries=False)


def request(method: str, path: str, body=None):
    """(status, parsed JSON) of one request to the test server."""
    resp = _pool.request(method, url() + path, body=None if body is None else orjson.dumps(body),
                         headers={"Content-Type": "application/json"}, timeout=60)
    return resp.status, (orjson.loads(resp.data) if resp.data else {})
