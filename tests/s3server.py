"""A local S3 server (moto) for the delta destination's tests: started once per test process on a free loopback
port, as a process of its own (deltalake holds the interpreter lock in some calls, so a server thread in the
test process could not answer them), stopped when the tests end. moto enforces conditional writes
(If-None-Match), as S3 does, so Delta's put-if-absent commits race there as they would on S3."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from . import localserver

BUCKET = "singer-ingest-test"
CREDENTIALS = {"delta_s3_access_key_id": "testing", "delta_s3_secret_access_key": "testing",
               "delta_s3_region": "us-east-1", "delta_s3_allow_http": True}

_lock = threading.Lock()
_endpoint: str | None = None


def endpoint() -> str:
    """The server's URL, starting it on first use (with the test bucket)."""
    global _endpoint
    with _lock:
        if _endpoint is None:
            port = localserver.free_port()
            server = Path(sys.executable).parent / "moto_server"
            if not server.exists():
                raise RuntimeError(f"{server} is missing: install the test extra (pip install -e '.[test]'), "
                                   f"which brings moto[server]")
            localserver.start([str(server), "-H", "127.0.0.1", "-p", str(port)], port, "moto_server")
            url = f"http://127.0.0.1:{port}"
            client(url).create_bucket(Bucket=BUCKET)
            _endpoint = url
        return _endpoint


def client(url: str | None = None):
    import boto3

    return boto3.client("s3", endpoint_url=url or endpoint(), aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def connection() -> dict:
    """The delta destination's worker settings for the local server."""
    return {"delta_s3_endpoint_url": endpoint(), **CREDENTIALS}
