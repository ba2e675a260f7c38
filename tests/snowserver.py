"""A local Snowflake stand-in (fakesnow in server mode) for the snowflake destination's tests: started once per
test process on a free loopback port, stopped when the tests end. fakesnow pins its own duckdb and sqlglot, so it
lives in a virtualenv of its own, ``.cache/fakesnow``, which scripts/test.sh makes (and the snowflake connector
of the tests talks to it over http, as to the service).

The server keeps its databases in memory, shared by every session; PUT uploads files to it over http (it
answers PUT as Snowflake answers for a GCS stage), and its stage files go to a temporary folder of its own, removed
with its log when the tests end (kept with SNOWSERVER_KEEP_LOG=1, to read the server's side of a failure)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from . import localserver

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "fakesnow"
DATABASE = "SINGER_INGEST_TEST"

_lock = threading.Lock()
_port: int | None = None


def _remove(folder: str) -> None:
    if not os.environ.get("SNOWSERVER_KEEP_LOG"):
        shutil.rmtree(folder, ignore_errors=True)


def port() -> int:
    """The server's port, starting it on first use."""
    global _port
    with _lock:
        if _port is None:
            server = VENV / "bin" / "fakesnow"
            if not server.exists():
                raise RuntimeError(f"{server} is missing: run scripts/test.sh, which makes the fakesnow virtualenv")
            free = localserver.free_port()
            folder = tempfile.mkdtemp(prefix="singer-ingest-fakesnow-")
            log = open(os.path.join(folder, "server.log"), "wb")
            localserver.start([str(server), "-s", "--host", "127.0.0.1", "-p", str(free)], free, "fakesnow",
                              timeout=60, hint=f"see {folder}/server.log", on_exit=lambda: _remove(folder),
                              stdout=log, stderr=subprocess.STDOUT, cwd=folder, env={**os.environ, "TMPDIR": folder})
            _port = free
        return _port


def connection() -> dict:
    """The snowflake destination's worker settings for the local server."""
    return {"snowflake_account": "test", "snowflake_user": "test", "snowflake_password": "test",
            "snowflake_database": DATABASE, "snowflake_host": "127.0.0.1", "snowflake_port": port(),
            "snowflake_protocol": "http"}


def connect(**extra):
    import snowflake.connector

    return snowflake.connector.connect(account="test", user="test", password="test", host="127.0.0.1",
                                       port=port(), protocol="http", **extra)
