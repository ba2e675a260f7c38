"""Shared fixtures: the real Redis and PostgreSQL servers, `rq worker` processes, the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from .procs import kill_tree

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "9"))
REDIS_URL = f"redis://{REDIS_HOST}:6379/{REDIS_DB}"
PG_DSN = os.environ.get("TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
GEN = ROOT.parent / "shared" / "bench" / "gen_singer.py"
START_SERVICES = "run scripts/services.sh (or the README's test command), which starts Redis and PostgreSQL"

# Tests stop processes with SIGINT, as Ctrl-C and systemd's KillSignal= do. A shell starts a background job
# with SIGINT ignored, and every process started from it would inherit that (a shell cannot even trap a
# signal ignored on entry), so the suite takes SIGINT back: a caught signal is at its default after exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Markers (README, "Tests"): ``integration`` for every test that talks to a server or runs the product's
# processes, so ``-m "not integration"`` leaves the fast unit tests; ``postgres`` / ``mysql`` for the tests that
# need that server, so one destination's tests run alone (``-m mysql``). They follow from the fixtures a test
# uses, so a new test is marked without anyone remembering to.
SERVER_FIXTURES = {"redis_url", "redis_conn", "fresh_redis", "workers", "cli", "pg_schema", "dest", "meltano_venv",
                   "mysql_database", "s3_endpoint", "es_harness"}


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & SERVER_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if "pg_schema" in used:
            item.add_marker(pytest.mark.postgres)
        if "mysql_database" in used:
            item.add_marker(pytest.mark.mysql)
        if "es_harness" in used:
            item.add_marker(pytest.mark.elasticsearch)
        if item.get_closest_marker("delta_s3"):  # the delta destination on S3 is one of delta's cases
            item.add_marker(pytest.mark.delta)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); {START_SERVICES}")
    return REDIS_URL


@pytest.fixture()
def redis_conn(redis_url):
    return redis.Redis.from_url(redis_url)


@dataclass
class CliResult:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def states(self) -> list:
        import orjson

        out = []
        for line in self.stdout.splitlines():
            msg = orjson.loads(line)
            assert msg["type"] == "STATE", line
            out.append(msg["value"])
        return out


def run_cli(args: list[str], *, input_bytes: bytes | None = None, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 240) -> CliResult:
    """Run the installed `singer-ingest` console script."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SINGER_INGEST_")}
    full_env.update(env or {})
    proc = subprocess.run([str(BIN / "singer-ingest"), *args], input=input_bytes, capture_output=True,
                          env=full_env, cwd=cwd, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


@pytest.fixture()
def cli():
    return run_cli


def generate(records: int, *extra: str) -> bytes:
    """Tap output from the shared generator."""
    return subprocess.run([sys.executable, str(GEN), "--records", str(records), *extra], check=True,
                          capture_output=True).stdout


class Workers:
    """`rq worker singer-ingest` processes, started with the RQ CLI as shipped."""

    def __init__(self, url: str, logdir: Path, env: dict | None = None):
        self.url = url
        self.logdir = logdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SINGER_INGEST_")}
        self.env.update(env or {})
        self.procs: list[subprocess.Popen] = []
        self.prefix: list[str] = []  # e.g. ["ip", "netns", "exec", "host1"] to run on another test host

    def start(self, n: int = 1) -> list[subprocess.Popen]:
        started = []
        for _ in range(n):
            log = open(self.logdir / f"worker-{len(self.procs) + 1}.log", "wb")
            proc = subprocess.Popen([*self.prefix, str(BIN / "rq"), "worker", "singer-ingest", "--url", self.url,
                                     "--worker-ttl", "30"], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.logdir, start_new_session=True)
            self.procs.append(proc)
            started.append(proc)
        conn = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        from rq import Worker

        while len(Worker.all(connection=conn)) < len([p for p in self.procs if p.poll() is None]):
            if time.monotonic() > deadline:
                raise AssertionError(f"rq workers did not register; see {self.logdir}")
            time.sleep(0.1)
        return started

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Kill a worker and its work horse (rq puts the horse in a process group of its own)."""
        kill_tree(proc.pid, sig)
        proc.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("worker-*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture()
def fresh_redis(redis_url):
    """The test database of the real Redis, emptied (queue, workers and runs of earlier tests)."""
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    return conn


@pytest.fixture()
def workers(fresh_redis, redis_url, tmp_path):
    w = Workers(redis_url, tmp_path)
    yield w
    w.stop()


@pytest.fixture()
def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture()
def pg_schema():
    """A fresh, uniquely named PostgreSQL schema, dropped afterwards (from a new connection: a test may
    have restarted the server)."""
    import psycopg2
    from psycopg2 import sql

    try:
        psycopg2.connect(PG_DSN).close()
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable ({exc}); {START_SERVICES}")
    name = "t_" + uuid.uuid4().hex[:10]
    yield name
    con = psycopg2.connect(PG_DSN)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    con.close()


def start_feeder(args: list[str], **popen) -> subprocess.Popen:
    """`singer-ingest` in the background, for tests that act on the run while it goes on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINGER_INGEST_")}
    return subprocess.Popen([str(BIN / "singer-ingest"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, **popen)


def first_state(feeder: subprocess.Popen) -> bytes:
    """Wait for the run's first committed STATE line: proof that the run is under way."""
    line = feeder.stdout.readline()
    assert line.startswith(b'{"type":"STATE"'), feeder.stderr.read().decode()
    return line


def finish(feeder: subprocess.Popen, first: bytes = b"", timeout: float = 300,
           rest: bytes | None = None) -> tuple[list, str]:
    """Wait for the feeder, writing ``rest`` to its standard input first (then closed); return every STATE
    value it printed and its stderr."""
    import orjson

    out, err = feeder.communicate(rest, timeout=timeout)
    return [orjson.loads(line)["value"] for line in (first + out).splitlines()], err.decode()


MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/")


@pytest.fixture()
def mysql_database():
    """A fresh, uniquely named MySQL/MariaDB database (created by the destination when it opens), dropped
    afterwards."""
    import pymysql

    from sinks.mysql.destination import parse_url

    kwargs = parse_url(MYSQL_URL)
    kwargs.pop("database")
    try:
        pymysql.connect(**kwargs).close()
    except pymysql.err.OperationalError as exc:
        pytest.fail(f"MySQL/MariaDB is not reachable at {kwargs['host']}:{kwargs['port']} ({exc.args[-1]}); "
                    f"run scripts/services.sh, which starts MariaDB (or set TEST_MYSQL_URL)")
    name = "t_" + uuid.uuid4().hex[:10]
    yield name
    con = pymysql.connect(**kwargs, autocommit=True)
    try:
        with con.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        con.close()


@pytest.fixture()
def es_harness(tmp_path):
    """The elasticsearch destination on the local osmem-server (tests/osmem.py, started on first use), under an
    index prefix of its own, removed afterwards."""
    from .destinations import ElasticsearchHarness

    harness = ElasticsearchHarness(tmp_path)
    yield harness
    harness.cleanup()


# singer-sdk's target test streams (tests/test_sdk_streams.py says what each must do), from its wheel.
SDK_VERSION = "0.54.9"
SDK_CACHE = ROOT / ".cache" / f"singer-sdk-{SDK_VERSION}"


@pytest.fixture(scope="session")
def sdk_streams() -> Path:
    folder = SDK_CACHE / "singer_sdk" / "testing" / "target_test_streams"
    if not folder.is_dir():
        SDK_CACHE.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(SDK_CACHE),
                               f"singer-sdk=={SDK_VERSION}"], capture_output=True, text=True)
        assert proc.returncode == 0, f"could not download singer-sdk {SDK_VERSION} from PyPI: {proc.stderr}"
        wheel = next(SDK_CACHE.glob("singer_sdk-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if "/target_test_streams/" in name:
                    zf.extract(name, SDK_CACHE)
    return folder
