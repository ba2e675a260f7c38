"""singer-ingest as a Meltano loader.

The plugin definition (meltano/target-singer-ingest.yml) is checked against the one definition of the
settings (ingest/config.py), and real Meltano, installed into .cache/meltano-venv, runs a replayed tap
into PostgreSQL through it: rows are compared with the input, and Meltano's stored state with the input's
last STATE.

`python -m tests.test_meltano` prints the settings section the definition must hold.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ingest.about import CAPABILITIES
from ingest.config import ENV_PREFIX, SETTINGS, Setting

from .conftest import PG_DSN, ROOT, generate
from .expected import assert_same_rows, expected_rows, model, postgres_rows

DEFINITION = ROOT / "meltano" / "target-singer-ingest.yml"
MELTANO_VENV = ROOT / ".cache" / "meltano-venv"
MELTANO_REQUIREMENT = "meltano>=4.4,<5"
INSTALL_TIMEOUT = 1200
LOADER = "target-singer-ingest"
TAP = "tap-replay"
# Where Meltano needs another default than the command line: Meltano stores the target's last stdout
# line as the state it hands the tap next time, so it must be the bare state value.
MELTANO_DEFAULTS = {"state_output": "value"}
WORKER_NOTE = (" With redis_url set, each worker reads this from its own config file (SINGER_INGEST_CONFIG) "
               "or environment, not from this configuration.")


# -- the plugin definition --------------------------------------------------------------------------------

def meltano_kind(setting: Setting) -> str:
    if setting.secret:
        return "password"
    if setting.choices:
        return "options"
    return {bool: "boolean", int: "integer", float: "decimal", str: "string", dict: "object"}[setting.type]


def expected_settings() -> list[dict]:
    """The definition's settings, as Meltano reads them, from ingest.config.SETTINGS."""
    out = []
    for s in SETTINGS:
        entry: dict = {"name": s.name, "kind": meltano_kind(s)}
        default = MELTANO_DEFAULTS.get(s.name, s.default)
        if default is not None:
            entry["value"] = default
        entry["env"] = ENV_PREFIX + s.name.upper()
        if s.secret:
            entry["sensitive"] = True
        if s.choices:
            entry["options"] = [{"label": c, "value": c} for c in s.choices]
        entry["description"] = s.help + (WORKER_NOTE if s.scope == "worker" else "")
        out.append(entry)
    return out


def settings_yaml() -> str:
    """The settings section of the definition (JSON scalars are YAML scalars)."""
    lines = ["settings:"]
    for entry in expected_settings():
        lines.append(f"- name: {entry['name']}")
        for key, value in entry.items():
            if key == "name":
                continue
            if key == "options":
                lines.append("  options:")
                for opt in value:
                    lines.append(f"  - label: {json.dumps(opt['label'])}")
                    lines.append(f"    value: {json.dumps(opt['value'])}")
            elif key in ("kind", "env"):
                lines.append(f"  {key}: {value}")
            else:
                lines.append(f"  {key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def base_python() -> str:
    """The interpreter this test environment was made from."""
    candidate = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(candidate) if candidate.exists() else getattr(sys, "_base_executable", sys.executable)


@pytest.fixture(scope="session")
def meltano_venv() -> Path:
    """A virtualenv with Meltano under .cache/, made on first use and reused after."""
    meltano = MELTANO_VENV / "bin" / "meltano"
    usable = meltano.exists() and subprocess.run([str(meltano), "--version"], check=False,
                                                 capture_output=True).returncode == 0
    if usable:
        return MELTANO_VENV
    steps = [[base_python(), "-m", "venv", "--clear", str(MELTANO_VENV)],
             [str(MELTANO_VENV / "bin" / "python"), "-m", "pip", "install", MELTANO_REQUIREMENT]]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"installing Meltano into {MELTANO_VENV} took over {INSTALL_TIMEOUT} s: `{shlex.join(cmd)}`; "
                        f"check that the package index is reachable")
        if proc.returncode != 0:
            pytest.fail(f"could not install Meltano into {MELTANO_VENV}: `{shlex.join(cmd)}` exited "
                        f"{proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return MELTANO_VENV


def read_yaml(venv: Path, path: Path):
    """Parse YAML with the PyYAML that Meltano brings (this project's own environment has none)."""
    proc = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
                           str(path)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_definition_matches_the_settings_and_capabilities(meltano_venv):
    definition = read_yaml(meltano_venv, DEFINITION)
    assert definition["name"] == LOADER
    assert definition["executable"] == "singer-ingest"
    assert definition["capabilities"] == list(CAPABILITIES)
    assert definition["settings"] == expected_settings(), (
        f"{DEFINITION} differs from ingest/config.py; its settings section must be:\n{settings_yaml()}")


# -- real Meltano ------------------------------------------------------------------------------------------

TAP_SCRIPT = '''\
"""Replays recorded tap output. Takes Meltano's tap arguments (--config, --discover, --catalog,
--state) and appends each call's arguments and given state to the file named by the setting `log`."""
import json
import shutil
import sys

args = sys.argv[1:]


def option(name):
    return args[args.index(name) + 1] if name in args else None


with open(option("--config")) as fh:
    config = json.load(fh)
state = None
if option("--state"):
    with open(option("--state")) as fh:
        state = json.load(fh)
with open(config["log"], "a") as log:
    log.write(json.dumps({"args": args, "state": state}) + "\\n")
if "--discover" in args:
    print(json.dumps({"streams": []}))
    sys.exit(0)
with open(config["path"], "rb") as fh:
    shutil.copyfileobj(fh, sys.stdout.buffer)
'''


class Meltano:
    """The `meltano` CLI in one project, without telemetry, update checks or this machine's SINGER_INGEST_*."""

    def __init__(self, venv: Path, cwd: Path):
        self.bin = str(venv / "bin" / "meltano")
        self.cwd = cwd
        drop = ("SINGER_INGEST_", "TARGET_SINGER_INGEST_", "TAP_REPLAY_", "MELTANO_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "VIRTUAL_ENV"}
        self.env.update(MELTANO_SEND_ANONYMOUS_USAGE_STATS="false", MELTANO_DISABLE_TRACKING="true",
                        MELTANO_CLI_DISABLE_VERSION_CHECK="true", NO_COLOR="1")

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.bin, *args], check=False, cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, (f"`meltano {shlex.join(args)}` exited {proc.returncode}:\n"
                                      f"{proc.stdout}\n{proc.stderr}")
        return proc


def write_yaml_definition(path: Path, **fields) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in fields.items()))
    return path


@pytest.mark.integration
@pytest.mark.timeout(INSTALL_TIMEOUT + 900)
def test_meltano_run_into_postgres_rows_and_state(meltano_venv, pg_schema, tmp_path):
    data = generate(20000)
    last_state = model(data)["users"]["last_state"]
    tap_output = tmp_path / "tap-output.singer"
    tap_output.write_bytes(data)
    tap_log = tmp_path / "tap-calls.jsonl"

    Meltano(meltano_venv, tmp_path)("init", "project", "--no-usage-stats")
    project = tmp_path / "project"
    meltano = Meltano(meltano_venv, project)

    tap = project / "tap_replay.py"
    tap.write_text(f"#!{sys.executable}\n" + TAP_SCRIPT)
    tap.chmod(0o755)
    meltano("add", "--plugin-type", "extractor", TAP, "--from-ref", str(write_yaml_definition(
        tmp_path / "tap-replay.yml", name=TAP, namespace="tap_replay", executable=str(tap),
        capabilities=["catalog", "discover", "state"], settings=[{"name": "path"}, {"name": "log"}])))
    meltano("config", "set", TAP, "path", str(tap_output))
    meltano("config", "set", TAP, "log", str(tap_log))

    # The shipped definition, installed from this checkout.
    loader_definition = tmp_path / "target-singer-ingest.yml"
    loader_definition.write_text("".join(
        f"pip_url: {json.dumps('-e ' + shlex.quote(str(ROOT)))}\n" if line.startswith("pip_url:") else line
        for line in DEFINITION.read_text().splitlines(keepends=True)))
    started = time.monotonic()
    meltano("add", "--plugin-type", "loader", LOADER, "--from-ref", str(loader_definition), timeout=INSTALL_TIMEOUT)
    print(f"meltano add (installs the loader): {time.monotonic() - started:.1f} s")
    meltano("config", "set", LOADER, "destination", "postgres")
    meltano("config", "set", LOADER, "postgres_dsn", PG_DSN)
    meltano("config", "set", LOADER, "default_target_schema", pg_schema)

    suffix = uuid.uuid4().hex[:8]
    state_id = f"dev:{TAP}-to-{LOADER}:{suffix}"
    started = time.monotonic()
    run = meltano("run", "--state-id-suffix", suffix, TAP, LOADER)
    print(f"meltano run: {time.monotonic() - started:.1f} s\n{run.stderr[-3000:]}")
    assert "Run completed" in run.stderr + run.stdout, run.stderr

    for name, stream in model(data).items():
        assert_same_rows(postgres_rows(PG_DSN, pg_schema, name, stream), expected_rows(stream), stream["keys"], name)
    assert state_id in meltano("state", "list").stdout.split()
    stored = json.loads(meltano("state", "get", state_id).stdout)
    assert stored == {"singer_state": last_state}, f"Meltano stored {stored}"

    # The next run of the pipeline hands the tap that state (here the tap has nothing new to send).
    empty = tmp_path / "nothing-new.singer"
    empty.write_bytes(b"")
    meltano("config", "set", TAP, "path", str(empty))
    meltano("run", "--state-id-suffix", suffix, TAP, LOADER)
    calls = [json.loads(line) for line in tap_log.read_text().splitlines()]
    extracts = [c for c in calls if "--discover" not in c["args"]]
    assert len(extracts) == 2 and "--state" not in extracts[0]["args"], calls
    assert "--catalog" in extracts[1]["args"] and extracts[1]["state"] == last_state, calls
    assert json.loads(meltano("state", "get", state_id).stdout) == {"singer_state": last_state}


if __name__ == "__main__":
    sys.stdout.write(settings_yaml())
