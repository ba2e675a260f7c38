"""Starting the local stand-in servers of the destination tests (moto, osmem-server, nx-27017, fakesnow,
bqemulator): each once per test process, as a process of its own on a free loopback port, waited for until it
answers, stopped when the tests end."""

from __future__ import annotations

import atexit
import socket
import subprocess
import time
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def start(argv: list[str], port: int, what: str, *, timeout: float = 30, ready: Callable[[], bool] | None = None,
          hint: str = "", on_exit: Callable[[], None] | None = None, **popen) -> subprocess.Popen:
    """Start ``argv`` and wait until ``ready()`` (default: the port accepts a connection); a server that exits or
    is not ready within ``timeout`` seconds is a RuntimeError naming it (and ``hint``: where its log is, what to
    install). It is stopped at exit, then ``on_exit`` runs."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    popen.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(argv, **popen)
    atexit.register(lambda: (stop(proc), on_exit and on_exit()))
    deadline = time.monotonic() + timeout
    while not (ready or (lambda: _accepts(port)))():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}" + (f"; {hint}" if hint else ""))
        time.sleep(0.1)
    return proc
