"""A MongoDB server for the mongodb destination's tests: ``SINGER_INGEST_TEST_MONGODB_URL`` when set (a real
``mongod``), else a local nx-27017 (a MongoDB wire-protocol server on SQLite, from the test extra) started once per
test process on a free loopback port with in-memory databases, stopped when the tests end."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path

from . import localserver

ENV = "SINGER_INGEST_TEST_MONGODB_URL"

_lock = threading.Lock()
_url: str | None = None


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
            port = localserver.free_port()
            server = Path(sys.executable).parent / "nx-27017"
            if not server.exists():
                raise RuntimeError(f"{server} is missing: install the test extra (pip install -e '.[test]'), which "
                                   f"brings nx-27017, or set {ENV} to a MongoDB server's URL")
            folder = tempfile.mkdtemp(prefix="singer-ingest-mongo-")
            localserver.start([str(server), "--data-dir", "memory", "--host", "127.0.0.1", "-p", str(port),
                               "--log-file", f"{folder}/server.log", "--pid-file", f"{folder}/server.pid"], port,
                              "nx-27017", hint=f"its log: {folder}/server.log")
            _url = f"mongodb://127.0.0.1:{port}/"
        return _url


def client():
    import pymongo

    return pymongo.MongoClient(url(), serverSelectionTimeoutMS=10_000)
