"""A local BigQuery server (bqemulator) for the bigquery destination's tests: started once per test process on a
free loopback port, from the virtualenv ``scripts/bqemulator.sh`` makes (it pins its own duckdb), stopped when
the tests end. In memory: every test uses datasets of its own."""

from __future__ import annotations

import atexit
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def endpoint() -> str:
    """The server's URL, starting it on first use (installing it first when its virtualenv is missing)."""
    global _endpoint, _pid
    with _lock:
        if _endpoint is None:
            if not SERVER.exists():
                setup = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True)
                if setup.returncode != 0:
                    raise RuntimeError(f"{SETUP} could not install bqemulator: {setup.stderr.strip()[-500:]}")
            port = _free_port()
            log = open(ROOT / ".cache" / "bqemulator.log", "wb")
            proc = subprocess.Popen([str(SERVER), "start", "--rest-host", "127.0.0.1", "--rest-port", str(port),
                                     "--grpc-host", "127.0.0.1", "--grpc-port", str(_free_port()),
                                     "--project", PROJECT, "--log-level", "warning"],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            atexit.register(_stop, proc)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{url}/bigquery/v2/projects/{PROJECT}/datasets", timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"bqemulator did not start on 127.0.0.1:{port}; see "
                                           f"{ROOT / '.cache' / 'bqemulator.log'}") from None
                    time.sleep(0.2)
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
