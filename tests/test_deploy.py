"""deploy/: the systemd units run as written, the env examples name every setting, the feed wrapper
resumes from the last committed STATE.

Units are started the way systemd starts them: ExecStart after expanding the specifiers it uses and the
variables of its Environment= and EnvironmentFile= lines, with only the install prefix
/opt/singer-ingest/venv/bin replaced by this venv's bin directory and /etc/singer-ingest by a directory of
env files written for the test; a stop sends KillSignal to the main process (KillMode=mixed) and SIGKILL
to everything left after TimeoutStopSec.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from rq import Worker

from ingest.config import BY_NAME, ENV_PREFIX, SETTINGS
from ingest.wire import RunKeys

from .conftest import BIN, PG_DSN, REDIS_URL, ROOT, finish, first_state, generate, run_cli, start_feeder
from .expected import assert_same_rows, expected_rows, model, postgres_rows
from .procs import descendants, kill_tree

DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
PREFIX = "/opt/singer-ingest/venv/bin"
ETC = "/etc/singer-ingest"
# What systemd gives a system service before Environment= and EnvironmentFile= (User= adds HOME and USER).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"


# -- unit files ------------------------------------------------------------------------------------------
def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys may repeat; a trailing backslash continues a line."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if pending is None and (not line or line[0] in "#;"):
            continue
        if pending is not None:
            line = f"{pending} {line}"
            pending = None
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit file line: {raw!r}"
        current.append((key.strip(), value.strip()))
    assert pending is None, "unit file ends in a continued line"
    return sections


class Unit:
    def __init__(self, filename: str):
        self.filename = filename
        self.sections = parse_unit((UNITS / filename).read_text())

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, section: str, key: str, default: str | None = None) -> str | None:
        found = self.values(section, key)
        return found[-1] if found else default

    def instance(self, instance: str) -> str:
        prefix, _, suffix = self.filename.partition("@")
        return f"{prefix}@{instance}{suffix}"


def expand_specifiers(text: str, unit_name: str) -> str:
    """systemd.unit(5) specifiers, for the ones these units use; any other fails the test."""
    prefix, _, rest = unit_name.partition("@")
    instance = rest.rsplit(".", 1)[0]
    table = {"i": instance, "I": instance, "p": prefix, "P": prefix, "n": unit_name,
             "N": unit_name.rsplit(".", 1)[0], "H": socket.gethostname(), "S": "/var/lib", "%": "%"}

    def one(m: re.Match) -> str:
        assert m.group(1) in table, f"specifier %{m.group(1)} in {unit_name} is not known to this test"
        return table[m.group(1)]

    return re.sub(r"%(.)", one, text)


def expand_variables(words: list[str], env: dict[str, str]) -> list[str]:
    """systemd.service(5): "${FOO}" is replaced within its word, a word "$FOO" splits into words."""
    out: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out.extend(env.get(whole.group(1), "").split())
        else:
            out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return out


def read_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile: KEY=VALUE lines, # and ; comments, optional quotes around the value."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def write_env_file(path: Path, values: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{k}="{v}"\n' for k, v in values.items()))
    path.chmod(0o600)


class UnitRunner:
    """Instances of one unit, started as systemd starts them and stopped as `systemctl stop` does."""

    def __init__(self, unit: Unit, etc: Path, bin_dir: Path, workdir: Path, logdir: Path):
        self.unit, self.etc, self.bin_dir, self.workdir, self.logdir = unit, etc, bin_dir, workdir, logdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.horses: dict[str, list[int]] = {}

    def _here(self, path: str) -> Path:
        assert path.startswith(ETC + "/"), path
        return self.etc / path[len(ETC) + 1:]

    def command(self, instance: str, extra_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
        name = self.unit.instance(instance)
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "HOME": str(self.workdir)}
        for line in self.unit.values("Service", "Environment"):
            for assignment in shlex.split(expand_specifiers(line, name)):
                key, _, value = assignment.partition("=")
                env[key] = value
        for line in self.unit.values("Service", "EnvironmentFile"):
            optional = line.startswith("-")
            path = self._here(expand_specifiers(line.lstrip("-"), name))
            if optional and not path.exists():
                continue
            env.update(read_env_file(path))
        env.update(extra_env or {})
        exec_start = self.unit.values("Service", "ExecStart")
        assert len(exec_start) == 1, exec_start
        argv = expand_variables(shlex.split(expand_specifiers(exec_start[0], name)), env)
        assert argv[0].startswith(PREFIX + "/"), f"ExecStart must run from {PREFIX}: {argv[0]}"
        argv[0] = str(self.bin_dir / argv[0][len(PREFIX) + 1:])
        return argv, env

    def start(self, instance: str) -> subprocess.Popen:
        argv, env = self.command(instance)
        log = open(self.logdir / f"{self.unit.instance(instance)}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                                start_new_session=True)
        self.procs[instance] = proc
        return proc

    def log(self, instance: str) -> str:
        return (self.logdir / f"{self.unit.instance(instance)}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {i}\n{self.log(i)}" for i in self.procs)

    @property
    def stop_timeout(self) -> float:
        value = self.unit.value("Service", "TimeoutStopSec")
        assert value is not None and value.isdigit(), value
        return float(value)

    def stop(self, instance: str) -> float:
        """KillSignal to the main process only (KillMode=mixed), SIGKILL to all that is left after
        TimeoutStopSec; returns how long the stop took."""
        assert self.unit.value("Service", "KillMode") == "mixed"
        proc = self.procs[instance]
        started = time.monotonic()
        if proc.poll() is None:
            children = descendants(proc.pid)
            os.kill(proc.pid, signal.Signals[self.unit.value("Service", "KillSignal", "SIGTERM")])
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in children:  # the cgroup's SIGKILL also reaches children that outlived the main process
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return time.monotonic() - started

    def stop_all(self) -> None:
        for instance in self.procs:
            self.stop(instance)


def rq_worker_names(conn: redis.Redis) -> set[str]:
    return {w.name for w in Worker.all(connection=conn)}


def wait_registered(conn: redis.Redis, runner: UnitRunner, names: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not names <= rq_worker_names(conn):
        assert all(p.poll() is None for p in runner.procs.values()), "a worker exited:\n" + runner.logs()
        assert time.monotonic() < deadline, f"rq workers {names} did not register:\n" + runner.logs()
        time.sleep(0.1)


def wait_for(predicate, what: str, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture()
def etc(tmp_path) -> Path:
    """Stands in for /etc/singer-ingest."""
    path = tmp_path / "etc"
    path.mkdir()
    return path


@pytest.fixture()
def worker_units(fresh_redis, etc, tmp_path):
    """singer-ingest-worker@N, configured by an env file with worker.env.example's keys pointing at the
    test Redis and PostgreSQL."""
    example = read_env_file(DEPLOY / "worker.env.example")
    values = {"RQ_REDIS_URL": REDIS_URL, "SINGER_INGEST_LOG_LEVEL": "INFO", "SINGER_INGEST_POSTGRES_DSN": PG_DSN}
    assert set(example) == set(values), "worker.env.example sets other keys than this test: update the test"
    write_env_file(etc / "worker.env", values)
    workdir = tmp_path / "var-lib"
    workdir.mkdir()
    runner = UnitRunner(Unit("singer-ingest-worker@.service"), etc, BIN, workdir, tmp_path)
    yield runner
    runner.stop_all()


def _target_config(tmp_path: Path, schema: str, **extra) -> Path:
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"destination": "postgres", "default_target_schema": schema, **extra}))
    return path


def _check_rows(schema: str, data: bytes) -> None:
    for name, stream in model(data).items():
        assert_same_rows(postgres_rows(PG_DSN, schema, name, stream), expected_rows(stream), stream["keys"], name)


# -- tests -------------------------------------------------------------------------------------------------
def _setting_names(path: Path, assigned_only: bool) -> set[str]:
    """SINGER_INGEST_* names a file mentions: as KEY= or #KEY= lines, or anywhere in a comment."""
    pattern = r"^#?(SINGER_INGEST_[A-Z0-9_]+)=" if assigned_only else r"\b(SINGER_INGEST_[A-Z0-9_]+)\b"
    return set(re.findall(pattern, path.read_text(), flags=re.M))


def test_env_examples_name_every_setting_of_their_scopes():
    env_name = {s.name: ENV_PREFIX + s.name.upper() for s in SETTINGS}
    known = set(env_name.values()) | {"SINGER_INGEST_CONFIG", "SINGER_INGEST_LOG_LEVEL", "SINGER_INGEST_LOG_FORMAT"}
    worker, feeder = DEPLOY / "worker.env.example", DEPLOY / "feeder.env.example"
    for path in (worker, feeder, DEPLOY / "feed.env.example"):
        unknown = _setting_names(path, assigned_only=False) - known
        assert not unknown, f"{path.name} names settings that do not exist: {sorted(unknown)}"
    # Worker settings as lines to uncomment; run settings at least named (they are set on the feeder side).
    missing = [env_name[s.name] for s in SETTINGS if s.scope == "worker"
               and env_name[s.name] not in _setting_names(worker, assigned_only=True)]
    missing += [env_name[s.name] for s in SETTINGS if s.scope == "run"
                and env_name[s.name] not in _setting_names(worker, assigned_only=False)]
    assert not missing, f"worker.env.example does not name {missing}"
    missing = [env_name[s.name] for s in SETTINGS if s.scope in ("feeder", "run")
               and env_name[s.name] not in _setting_names(feeder, assigned_only=True)]
    assert not missing, f"feeder.env.example does not name {missing}"
    # Secrets of the worker stay out of the feeder's files and the other way round.
    for s in SETTINGS:
        if s.secret and s.scope == "worker":
            assert env_name[s.name] not in _setting_names(feeder, assigned_only=True), s.name
        if s.secret and s.scope == "feeder":
            assert env_name[s.name] not in _setting_names(worker, assigned_only=True), s.name


def test_units_pass_systemd_analyze_verify(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: scripts/services.sh installs it"
    prefix = tmp_path / "venv-bin"
    prefix.mkdir()
    (prefix / "rq").symlink_to(BIN / "rq")
    (prefix / "singer-ingest-feed").symlink_to(DEPLOY / "bin" / "singer-ingest-feed")
    instances = []
    for path in sorted(UNITS.iterdir()):
        instance = path.name.replace("@.", "@2." if "worker" in path.name else "@shop.")
        (tmp_path / instance).write_text(path.read_text().replace(PREFIX, str(prefix)))
        instances.append(str(tmp_path / instance))
    result = subprocess.run(["systemd-analyze", "verify", *instances], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


@pytest.mark.integration
def test_two_workers_from_the_unit_load_postgres_exactly(worker_units, fresh_redis, pg_schema, run_id, tmp_path):
    worker_units.start("1")
    worker_units.start("2")
    host = socket.gethostname()
    wait_registered(fresh_redis, worker_units, {f"{host}-1", f"{host}-2"})
    data = generate(20000)
    result = run_cli(["--config", str(_target_config(tmp_path, pg_schema, batch_size_rows=3000)),
                      "--redis-url", REDIS_URL, "--run-id", run_id], input_bytes=data)
    assert result.returncode == 0, result.stderr + worker_units.logs()
    assert result.states[-1] == model(data)["users"]["last_state"]
    _check_rows(pg_schema, data)
    for instance in ("1", "2"):
        log = worker_units.log(instance)
        assert f"run {run_id}: worker " in log and " joined on host " in log, log
        assert f"INFO rq.worker: Worker {host}-{instance}: started" in log, log  # --name and --log-format


@pytest.mark.integration
def test_stopping_a_worker_unit_hands_its_streams_over_at_once(worker_units, fresh_redis, pg_schema, run_id,
                                                               tmp_path):
    """`systemctl stop` of a busy worker: it leaves the run within seconds, its leases released (not left
    to expire), its rq name free again; the other worker finishes the run exactly."""
    assert worker_units.unit.value("Service", "KillSignal") == "SIGTERM"
    worker_units.start("1")
    worker_units.start("2")
    host = socket.gethostname()
    wait_registered(fresh_redis, worker_units, {f"{host}-1", f"{host}-2"})
    data = generate(20000, "--state-every", "500")
    lines = data.splitlines(keepends=True)
    half = len(lines) // 2
    config = _target_config(tmp_path, pg_schema, batch_size_rows=500, max_record_age_seconds=0.5)
    feeder = start_feeder(["--config", str(config), "--redis-url", REDIS_URL, "--run-id", run_id],
                          stdin=subprocess.PIPE)
    try:
        feeder.stdin.write(b"".join(lines[:half]))
        feeder.stdin.flush()
        first = first_state(feeder)
        member = wait_for(lambda: re.search(rf"run {run_id}: worker (\S+) joined", worker_units.log("1")),
                          "worker 1 to join the run").group(1)
        keys = RunKeys(run_id)

        def leases_of(who: str) -> list[bytes]:
            return [v for v in (fresh_redis.get(k) for k in fresh_redis.scan_iter(keys.lease("*")))
                    if v and v.decode().startswith(who + "|")]

        wait_for(lambda: leases_of(member), "worker 1 to own a stream")
        took = worker_units.stop("1")
        assert worker_units.procs["1"].returncode == 0, worker_units.log("1")
        assert took < worker_units.stop_timeout - 10, f"stop took {took:.1f} s:\n{worker_units.log('1')}"
        assert "warm shut down requested" in worker_units.log("1")
        assert leases_of(member) == [], "worker 1 left its leases to expire instead of releasing them"
        assert f"{host}-1" not in rq_worker_names(fresh_redis)
        feeder.stdin.write(b"".join(lines[half:]))
        feeder.stdin.flush()  # finish() closes stdin: the end of input
        states, err = finish(feeder, first, timeout=240)
    finally:
        if feeder.poll() is None:
            feeder.kill()
            feeder.wait()
    assert feeder.returncode == 0, err + worker_units.logs()
    assert states[-1] == model(data)["users"]["last_state"]
    _check_rows(pg_schema, data)
    # Restart=always: the same name registers again at once.
    worker_units.start("1")
    wait_registered(fresh_redis, worker_units, {f"{host}-1", f"{host}-2"}, timeout=15)


FAKE_TAP = """#!{python}
import json, sys
args = sys.argv[1:]
config = json.load(open(args[args.index("--config") + 1]))
state = json.load(open(args[args.index("--state") + 1])) if "--state" in args else None
with open(config["log"], "a") as fh:
    fh.write(json.dumps({{"args": args, "state": state}}) + "\\n")
sys.stdout.buffer.write(open(config["output"], "rb").read())
sys.stdout.flush()
if config.get("hang"):
    import time
    time.sleep(3600)
sys.exit(config["exit"])
"""


@pytest.mark.integration
def test_feed_unit_resumes_each_run_from_the_last_committed_state(worker_units, fresh_redis, pg_schema, etc,
                                                                  tmp_path):
    worker_units.start("1")
    wait_registered(fresh_redis, worker_units, {f"{socket.gethostname()}-1"})
    # The install prefix: the wrapper installed next to singer-ingest and python, as deploy/README.md says.
    prefix = tmp_path / "venv-bin"
    prefix.mkdir()
    (prefix / "singer-ingest-feed").symlink_to(DEPLOY / "bin" / "singer-ingest-feed")
    for name in ("singer-ingest", "python"):
        (prefix / name).symlink_to(BIN / name)
    tap = tmp_path / "tap-fake"
    tap.write_text(FAKE_TAP.format(python=sys.executable))
    tap.chmod(0o755)
    tap_config, tap_log = tmp_path / "tap.json", tmp_path / "tap.log"

    feeder_example = read_env_file(DEPLOY / "feeder.env.example")
    feeder_values = {"SINGER_INGEST_REDIS_URL": REDIS_URL}
    assert set(feeder_example) == set(feeder_values), "feeder.env.example sets other keys than this test"
    write_env_file(etc / "feeder.env", feeder_values)
    feed_example = read_env_file(DEPLOY / "feed.env.example")
    # The wrapper reads STATE messages whatever the target config asks singer-ingest to print.
    bare = {"state_output": "value"} if "state_output" in BY_NAME else {}
    target = _target_config(tmp_path, pg_schema, batch_size_rows=1000, max_record_age_seconds=1, **bare)
    feed_values = {"FEED_TAP": str(tap), "FEED_TAP_CONFIG": str(tap_config), "FEED_TARGET_CONFIG": str(target)}
    assert set(feed_example) == set(feed_values), "feed.env.example sets other keys than this test"
    write_env_file(etc / "feed" / "shop.env", feed_values)
    state_dir = tmp_path / "state"  # StateDirectory=: systemd creates it and names it in $STATE_DIRECTORY
    state_dir.mkdir()
    feeds = UnitRunner(Unit("singer-ingest-feed@.service"), etc, prefix, state_dir, tmp_path)
    argv, env = feeds.command("shop", {"STATE_DIRECTORY": str(state_dir)})
    assert argv == [str(prefix / "singer-ingest-feed"), "shop"]

    def start(data: bytes, exit_code: int = 0, hang: bool = False) -> subprocess.Popen:
        output = tmp_path / "tap-output.singer"
        output.write_bytes(data)
        tap_config.write_text(json.dumps({"output": str(output), "log": str(tap_log), "exit": exit_code,
                                          "hang": hang}))
        # Its own process group stands in for the unit's cgroup.
        return subprocess.Popen(argv, env=env, cwd=state_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def wait(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def feed(data: bytes, exit_code: int = 0) -> subprocess.CompletedProcess:
        return wait(start(data, exit_code))

    def kept() -> tuple[list[str], object]:
        return (state_dir / "state.jsonl").read_text().splitlines(), json.loads((state_dir / "state.json").read_text())

    runs = [generate(3000, "--state-every", "500", "--seed", str(seed)) for seed in (1, 2, 3, 4)]
    last = [model(data)["users"]["last_state"] for data in runs]
    assert len({json.dumps(v, sort_keys=True) for v in last}) == 4

    first = feed(runs[0])
    assert first.returncode == 0, first.stderr + worker_units.logs()
    lines, value = kept()
    assert value == last[0] and len(lines) == 1 and json.loads(lines[0]) == {"type": "STATE", "value": last[0]}

    second = feed(runs[1])
    assert second.returncode == 0, second.stderr + worker_units.logs()
    assert kept()[1] == last[1]

    # A tap that fails after its output: the wrapper fails with its status, the committed STATE is kept.
    third = feed(runs[2], exit_code=3)
    assert third.returncode == 3, third.stderr
    assert "tap exited 3, singer-ingest 0" in third.stderr
    assert kept()[1] == last[2]

    # `systemctl stop` mid-run: KillSignal=SIGINT to every process of the unit. The feeder fails the run
    # (its workers leave it) and exits 130; what it printed before is kept for the next run.
    assert feeds.unit.value("Service", "KillSignal") == "SIGINT"
    fourth = start(runs[3], hang=True)
    try:
        wait_for(lambda: len((state_dir / "state.jsonl").read_text().splitlines()) > 1, "a STATE of the 4th run")
        os.killpg(fourth.pid, signal.SIGINT)
        stopped = wait(fourth, timeout=feeds.stop_timeout)
    finally:
        if fourth.poll() is None:
            os.killpg(fourth.pid, signal.SIGKILL)
            fourth.wait()
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted" in stopped.stderr and "tap exited 130, singer-ingest 130" in stopped.stderr, stopped.stderr
    lines, value = kept()
    assert len(lines) == 1 and json.loads(lines[0])["value"] == value
    fourth_id = re.search(r"run (shop-\S+):", stopped.stderr).group(1)
    assert fresh_redis.hget(RunKeys(fourth_id).meta, "status") == b"failed"
    with pytest.raises(ProcessLookupError):  # the tap and the feeder are gone with the wrapper
        os.killpg(fourth.pid, 0)

    calls = [json.loads(line) for line in tap_log.read_text().splitlines()]
    assert [c["state"] for c in calls] == [None, last[0], last[1], last[2]]
    assert calls[0]["args"] == ["--config", str(tap_config)]
    assert calls[1]["args"] == ["--config", str(tap_config), "--state", str(state_dir / "state.json")]
    run_ids = re.findall(r"run (shop-\S+):", first.stderr + second.stderr + third.stderr + stopped.stderr)
    assert len(set(run_ids)) == 4, run_ids
