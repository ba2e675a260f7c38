"""Configuration: one definition of every setting, built into frozen objects at the edge.

Sources, later ones win: defaults, the ``--config`` JSON file (Singer convention), environment
variables ``SINGER_INGEST_<SETTING NAME IN UPPER CASE>``. Unknown keys in the file are errors.

Settings have a *scope*:
- ``run``: travels with the run (in Redis) so every worker applies the same batching and loading rules.
  Never secret.
- ``worker``: destination connection settings. Read by each worker from its own config file
  (``SINGER_INGEST_CONFIG``) and environment; never sent through Redis, never logged.
- ``feeder``: used by the feeder process only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import orjson

from .errors import ConfigError

ENV_PREFIX = "SINGER_INGEST_"
WORKER_CONFIG_ENV = "SINGER_INGEST_CONFIG"

LOAD_METHODS = ("upsert", "append-only", "overwrite")
DESTINATIONS = ("duckdb", "postgres")
STATE_OUTPUTS = ("message", "value")
UNDECLARED_PROPERTIES = ("warn", "error")


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    scope: str
    help: str
    secret: bool = False
    choices: tuple[str, ...] = ()


SETTINGS: tuple[Setting, ...] = (
    Setting("destination", str, "duckdb", "run", "Where records are loaded.", choices=DESTINATIONS),
    Setting("duckdb_path", str, "singer_ingest.duckdb", "run",
            "DuckDB database file for the duckdb destination (relative to the feeder's directory)."),
    Setting("default_target_schema", str, None, "run",
            "Schema the tables are created in (created if missing); destination default when unset."),
    Setting("batch_size_rows", int, 10_000, "run", "Flush a stream's batch when it holds this many records."),
    Setting("max_batch_bytes", int, 100_000_000, "run",
            "Flush a stream's batch when its records take this many bytes of input."),
    Setting("max_record_age_seconds", float, 300.0, "run",
            "Flush a stream's batch when its oldest record has waited this long."),
    Setting("max_parallelism", int, 8, "run", "How many sinks a worker drains at once (joblib threads)."),
    Setting("validate_records", bool, True, "run", "Validate every record against its stream's JSON schema."),
    Setting("load_method", str, "upsert", "run",
            "upsert: streams with key_properties are upserted, others appended; append-only: every record "
            "is a new row; overwrite: each stream's table is replaced by the run's records.",
            choices=LOAD_METHODS),
    Setting("hard_delete", bool, False, "run",
            "ACTIVATE_VERSION deletes rows of older versions instead of setting _sdc_deleted_at."),
    Setting("add_record_metadata", bool, True, "run",
            "Add _sdc_extracted_at, _sdc_received_at, _sdc_batched_at, _sdc_sequence, _sdc_table_version "
            "and _sdc_deleted_at columns."),
    Setting("allow_unknown_message_types", bool, False, "run",
            "Skip messages of unknown type instead of failing the run."),
    Setting("undeclared_properties", str, "warn", "run",
            "Record properties the stream's schema does not declare are not loaded. warn: log each one the "
            "first time it is seen and count the records that carried any in the run summary; error: fail "
            "the run, naming the input line and stream.", choices=UNDECLARED_PROPERTIES),
    Setting("lease_ttl_seconds", float, 15.0, "run",
            "A worker's hold on a stream expires this long after it stops renewing it; another worker "
            "then takes the stream over."),
    Setting("job_timeout_seconds", int, 7 * 86400, "feeder", "RQ job_timeout of the run's worker jobs."),
    Setting("max_workers_per_run", int, 8, "feeder",
            "How many RQ jobs (one per worker process) a run asks for; each owns a share of the streams."),
    Setting("max_backlog_bytes", int, 256 * 1024 * 1024, "feeder",
            "The feeder waits while this many bytes of input sit unacknowledged in Redis."),
    Setting("chunk_size_rows", int, 500, "feeder", "Messages per Redis stream entry."),
    Setting("max_line_bytes", int, 64 * 1024 * 1024, "feeder", "Longest input line accepted."),
    Setting("run_ttl_seconds", int, 7 * 86400, "feeder",
            "How long a finished run's metadata and last STATE stay in Redis."),
    Setting("state_output", str, "message", "feeder",
            "How committed STATE goes to stdout: message prints Singer STATE messages "
            "({\"type\": \"STATE\", \"value\": ...}); value prints the bare state value, as singer-python "
            "targets do, for `tail -1` into a tap's --state file and for Meltano (its plugin definition sets it).",
            choices=STATE_OUTPUTS),
    Setting("redis_url", str, None, "feeder",
            "Redis for the distributed mode (also --redis-url); unset runs everything in one process.",
            secret=True),
    Setting("postgres_dsn", str, None, "worker", "libpq connection string or URL for the postgres destination.",
            secret=True),
    Setting("host", str, None, "worker", "PostgreSQL host."),
    Setting("port", int, None, "worker", "PostgreSQL port."),
    Setting("user", str, None, "worker", "PostgreSQL user."),
    Setting("password", str, None, "worker", "PostgreSQL password.", secret=True),
    Setting("database", str, None, "worker", "PostgreSQL database."),
    Setting("metrics_port", int, None, "worker",
            "Serve Prometheus metrics on this port while the worker loads a run (unset: no metrics). "
            "Give each worker process on a host its own port."),
    Setting("metrics_address", str, "0.0.0.0", "worker", "Address the metrics port listens on."),
)
BY_NAME = {s.name: s for s in SETTINGS}


def _coerce(setting: Setting, value: Any, origin: str) -> Any:
    if value is None:
        return None
    t = setting.type
    try:
        if t is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                out = True
            elif isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError(value)
        elif t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            out = int(value)
        elif t is float:
            if isinstance(value, bool):
                raise ValueError(value)
            out = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError(value)
            out = value
    except (TypeError, ValueError):
        shown = "***" if setting.secret else repr(value)
        raise ConfigError(f"setting {setting.name!r} from {origin} must be {t.__name__}, got {shown}") from None
    if setting.choices and out not in setting.choices:
        raise ConfigError(f"setting {setting.name!r} from {origin} must be one of {', '.join(setting.choices)}, "
                          f"got {out!r}")
    if t in (int, float) and out is not None and out <= 0 and setting.name != "port":
        raise ConfigError(f"setting {setting.name!r} from {origin} must be positive, got {out!r}")
    return out


def read_config_file(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = orjson.loads(fh.read())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def resolve(file_values: Mapping[str, Any], env: Mapping[str, str], origin: str,
            scopes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Merge defaults, file values and environment overrides; check every key and value."""
    unknown = sorted(k for k in file_values if k not in BY_NAME)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in {origin}; known settings: "
                          f"{', '.join(s.name for s in SETTINGS)}")
    out: dict[str, Any] = {}
    for s in SETTINGS:
        if scopes is not None and s.scope not in scopes:
            continue
        value = _coerce(s, file_values.get(s.name), origin) if s.name in file_values else s.default
        env_name = ENV_PREFIX + s.name.upper()
        if env.get(env_name, "") != "":
            value = _coerce(s, env[env_name], f"environment variable {env_name}")
        out[s.name] = value
    return out


@dataclass(frozen=True)
class RunSettings:
    """What every worker of a run applies. Travels through Redis: nothing secret here."""

    destination: str = "duckdb"
    duckdb_path: str = "singer_ingest.duckdb"
    default_target_schema: str | None = None
    batch_size_rows: int = 10_000
    max_batch_bytes: int = 100_000_000
    max_record_age_seconds: float = 300.0
    max_parallelism: int = 8
    validate_records: bool = True
    load_method: str = "upsert"
    hard_delete: bool = False
    add_record_metadata: bool = True
    allow_unknown_message_types: bool = False
    undeclared_properties: str = "warn"
    lease_ttl_seconds: float = 15.0

    def to_json(self) -> bytes:
        return orjson.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, data: bytes | str) -> "RunSettings":
        raw = orjson.loads(data)
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


@dataclass(frozen=True)
class FeederSettings:
    job_timeout_seconds: int = 7 * 86400
    max_workers_per_run: int = 8
    max_backlog_bytes: int = 256 * 1024 * 1024
    chunk_size_rows: int = 500
    max_line_bytes: int = 64 * 1024 * 1024
    run_ttl_seconds: int = 7 * 86400
    state_output: str = "message"
    redis_url: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ConnectionSettings:
    """Destination connection, from the worker's own environment or config file."""

    postgres_dsn: str | None = field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    metrics_port: int | None = None
    metrics_address: str = "0.0.0.0"


@dataclass(frozen=True)
class TargetConfig:
    run: RunSettings
    feeder: FeederSettings
    connection: ConnectionSettings


def _split(values: dict[str, Any]) -> TargetConfig:
    def pick(cls):
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    return TargetConfig(pick(RunSettings), pick(FeederSettings), pick(ConnectionSettings))


def load_target_config(path: str | None, env: Mapping[str, str] | None = None,
                       overrides: Mapping[str, Any] | None = None) -> TargetConfig:
    """The feeder's configuration: ``--config`` file, environment, then command-line overrides."""
    env = os.environ if env is None else env
    file_values = read_config_file(path) if path else {}
    values = resolve(file_values, env, f"config file {path}" if path else "defaults")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(BY_NAME[key], value, "the command line")
    return _split(values)


def load_worker_connection(env: Mapping[str, str] | None = None) -> ConnectionSettings:
    """A worker's own destination connection: file named by SINGER_INGEST_CONFIG, then environment."""
    env = os.environ if env is None else env
    path = env.get(WORKER_CONFIG_ENV)
    file_values = read_config_file(path) if path else {}
    values = resolve(file_values, env, f"config file {path}" if path else "worker environment",
                     scopes=("worker",))
    return ConnectionSettings(**values)
