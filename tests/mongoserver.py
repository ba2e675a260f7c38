"""A MongoDB server for the mongodb destination's tests: ``SINGER_INGEST_TEST_MONGODB_URL`` when set (a real
``mongod``), else a local nx-27017 (a MongoDB wire-protocol server on SQLite, from the test extra) started once per
test process on a free loopback port with in-memory databases, stopped when the tests end."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = "SINGER_INGEST_TEST_MONGODB_URL"

_lock = threading.Lock()
_url: str | None = None


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def real() -> bool:
    """Whether the tests run against a server named by the environment (a real mongod) rather than nx-27017."""
    return bool(os.environ.get(ENV))


def url() -> str:
    """The server's URL, starting nx-27017 on first use."""
    global _url
    with _lock:
        if _url is None:
            if os.environ.get(ENV):
                _url = os.environ[ENV]
                return _url
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            server = Path(sys.executable).parent / "nx-27017"
            if not server.exists():
                raise RuntimeError(f"{server} is missing: install the test extra (pip install -e '.[test]'), which "
                                   f"brings nx-27017, or set {ENV} to a MongoDB server's URL")
            folder = tempfile.mkdtemp(prefix="singer-ingest-mongo-")
            proc = subprocess.Popen([str(server), "--data-dir", "memory", "--host", "127.0.0.1", "-p", str(port),
                                     "--log-file", f"{folder}/server.log", "--pid-file", f"{folder}/server.pid"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            atexit.register(_stop, proc)
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"nx-27017 did not start on 127.0.0.1:{port} (log: {folder}/server.log)") \
                            from None
                    time.sleep(0.1)
            _url = f"mongodb://127.0.0.1:{port}/"
        return _url


def client():
    import pymongo

    return pymongo.MongoClient(url(), serverSelectionTimeoutMS=10_000)
