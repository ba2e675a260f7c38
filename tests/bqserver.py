"""A local BigQuery server (bqemulator) for the bigquery destination's tests: started once per test process on a
free loopback port, from the virtualenv ``scripts/bqemulator.sh`` makes (it pins its own duckdb), stopped when
the tests end. In memory: every test uses datasets of its own."""

from __future__ import annotations

import subprocess
import threading
import urllib.request
from pathlib import Path

from . import localserver

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / ".cache" / "bqemulator" / "bin" / "bqemulator"
SETUP = ROOT / "scripts" / "bqemulator.sh"
PROJECT = "test-project"

_lock = threading.Lock()
_endpoint: str | None = None
_pid: int | None = None


def pid() -> int | None:
    """The server's process id, once it runs (the benchmark reads its CPU time)."""
    return _pid


def endpoint() -> str:
    """The server's URL, starting it on first use (installing it first when its virtualenv is missing)."""
    global _endpoint, _pid
    with _lock:
        if _endpoint is None:
            if not SERVER.exists():
                setup = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True)
                if setup.returncode != 0:
                    raise RuntimeError(f"{SETUP} could not install bqemulator: {setup.stderr.strip()[-500:]}")
            port = localserver.free_port()
            log = open(ROOT / ".cache" / "bqemulator.log", "wb")
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                try:
                    urllib.request.urlopen(f"{url}/bigquery/v2/projects/{PROJECT}/datasets", timeout=2).close()
                    return True
                except OSError:
                    return False

            proc = localserver.start([str(SERVER), "start", "--rest-host", "127.0.0.1", "--rest-port", str(port),
                                      "--grpc-host", "127.0.0.1", "--grpc-port", str(localserver.free_port()),
                                      "--project", PROJECT, "--log-level", "warning"], port, "bqemulator",
                                     timeout=90, ready=ready, hint=f"see {ROOT / '.cache' / 'bqemulator.log'}",
                                     stdout=log, stderr=subprocess.STDOUT)
            _endpoint, _pid = url, proc.pid
        return _endpoint


def connection() -> dict:
    """The bigquery destination's worker settings for the local server."""
    return {"bigquery_api_endpoint": endpoint()}


def client():
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                           client_options=ClientOptions(api_endpoint=endpoint()))
