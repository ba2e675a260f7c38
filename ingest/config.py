"""Configuration: one definition of every setting, built into frozen objects at the edge.

Sources, later ones win: defaults, the ``--config`` JSON file (Singer convention), environment
variables ``SINGER_INGEST_<SETTING NAME IN UPPER CASE>``. Unknown keys in the file are errors.

Core settings are declared here; each destination declares its own (``sinks.kit.DestinationPlugin.settings``),
and ``SETTINGS`` is the union of both, read lazily from the destination registry.

Settings have a *scope*:
- ``run``: travels with the run (in Redis) so every worker applies the same batching and loading rules.
  Never secret.
- ``worker``: destination connection settings. Read by each worker from its own config file
  (``SINGER_INGEST_CONFIG``) and environment; never sent through Redis, never logged.
- ``feeder``: used by the feeder process only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import orjson

from .errors import ConfigError

ENV_PREFIX = "SINGER_INGEST_"
WORKER_CONFIG_ENV = "SINGER_INGEST_CONFIG"

LOAD_METHODS = ("upsert", "append-only", "overwrite")
STATE_OUTPUTS = ("message", "value")
UNDECLARED_PROPERTIES = ("warn", "error")
BAD_RECORDS = ("fail", "dead_letter")


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    scope: str
    help: str
    secret: bool = False
    choices: tuple[str, ...] = ()
    destination: str | None = None  # the destination that declares it (None: a core setting)
    path: bool = False              # a local path, relative to the feeder's directory (made absolute there)


CORE_SETTINGS: tuple[Setting, ...] = (
    Setting("destination", str, "duckdb", "run", "Where records are loaded (the destinations' own settings follow "
            "the core ones)."),
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
    Setting("bad_records", str, "fail", "run",
            "fail: a record that fails its schema or that the destination refuses fails the run; dead_letter: it "
            "goes, with its stream, input line, error and JSON, into the _singer_ingest_dead_letter table in the "
            "same commit as its batch, and the run goes on (counted per stream in the run summary and status).",
            choices=BAD_RECORDS),
    Setting("stream_maps", dict, None, "run",
            "singer-sdk stream maps: per stream, __alias__, __filter__, __key_properties__, __else__, properties "
            "set to null to drop them and new properties from expressions (md5(), sha256(), ...); a stream set "
            "to null is not loaded. Applied by the workers before validation. Needs singer-ingest[maps]."),
    Setting("flattening_enabled", bool, False, "run",
            "Nested objects become columns parent__child (singer-sdk flattening), up to flattening_max_depth; "
            "deeper values stay JSON. Needs singer-ingest[maps]."),
    Setting("flattening_max_depth", int, None, "run",
            "How many levels of nested objects flattening_enabled turns into columns (required with it)."),
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
    Setting("metrics_port", int, None, "worker",
            "Serve Prometheus metrics on this port while the worker loads a run (unset: no metrics). "
            "Give each worker process on a host its own port."),
    Setting("metrics_address", str, "0.0.0.0", "worker", "Address the metrics port listens on."),
    Setting("stream_map_config", dict, None, "worker",
            "Values stream map expressions read as config['name'] (a hash salt, say). Read by each worker from "
            "its own config, never sent through Redis.", secret=True),
)


@functools.lru_cache(maxsize=None)
def all_settings() -> tuple[Setting, ...]:
    """The core settings, then each registered destination's, in registry order; ``destination`` lists the
    registered names as its choices."""
    from sinks import kit

    plugins = kit.plugins()
    out = [dataclasses.replace(s, choices=tuple(plugins)) if s.name == "destination" else s for s in CORE_SETTINGS]
    seen = {s.name: None for s in out}
    for plugin in plugins.values():
        for s in plugin.settings:
            if s.name in seen:
                owner = seen[s.name] or "the core settings"
                raise ConfigError(f"destination {plugin.name!r} declares setting {s.name!r}, which {owner} "
                                  f"already declares; each setting is declared once")
            seen[s.name] = f"destination {plugin.name!r}"
            out.append(dataclasses.replace(s, destination=plugin.name))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def settings_by_name() -> dict[str, Setting]:
    return {s.name: s for s in all_settings()}


def __getattr__(name: str) -> Any:
    # SETTINGS and BY_NAME take in the destinations' settings, so they are read from the registry when first used.
    if name == "SETTINGS":
        return all_settings()
    if name == "BY_NAME":
        return settings_by_name()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        elif t is dict:
            out = orjson.loads(value) if isinstance(value, (str, bytes)) else value
            if not isinstance(out, dict):
                raise ValueError(value)
        else:
            if not isinstance(value, str):
                raise ValueError(value)
            out = value
    except (TypeError, ValueError, orjson.JSONDecodeError):
        shown = "***" if setting.secret else repr(value)
        kind = "a JSON object" if t is dict else t.__name__
        raise ConfigError(f"setting {setting.name!r} from {origin} must be {kind}, got {shown}") from None
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
    settings = all_settings()
    unknown = sorted(k for k in file_values if k not in settings_by_name())
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in {origin}; known settings: "
                          f"{', '.join(s.name for s in settings)}")
    out: dict[str, Any] = {}
    for s in settings:
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
    bad_records: str = "fail"
    stream_maps: Mapping[str, Any] | None = None
    flattening_enabled: bool = False
    flattening_max_depth: int | None = None
    lease_ttl_seconds: float = 15.0
    destination_settings: Mapping[str, Any] = field(default_factory=dict)  # run-scoped settings of destinations

    def option(self, name: str) -> Any:
        """A run-scoped setting declared by a destination (its default when the run did not set it)."""
        if name in self.destination_settings:
            return self.destination_settings[name]
        return _declared(name, "run").default

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
    """A worker's own settings: the destinations' connection settings, from the worker's own environment or
    config file, and its metrics port. Never sent through Redis; secrets never shown (repr=False)."""

    metrics_port: int | None = None
    metrics_address: str = "0.0.0.0"
    stream_map_config: Mapping[str, Any] | None = field(default=None, repr=False)
    destination_settings: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def option(self, name: str) -> Any:
        """A worker-scoped setting declared by a destination (its default when unset)."""
        if name in self.destination_settings:
            return self.destination_settings[name]
        return _declared(name, "worker").default


def _declared(name: str, scope: str) -> Setting:
    s = settings_by_name().get(name)
    if s is None:
        raise KeyError(f"no setting {name!r} is declared")
    if s.scope != scope or s.destination is None:
        raise KeyError(f"{name!r} is not a {scope}-scoped destination setting")
    return s


@dataclass(frozen=True)
class TargetConfig:
    run: RunSettings
    feeder: FeederSettings
    connection: ConnectionSettings


def _declared_by_destinations(values: Mapping[str, Any], scope: str) -> dict[str, Any]:
    return {s.name: values[s.name] for s in all_settings()
            if s.destination is not None and s.scope == scope and s.name in values}


def _split(values: dict[str, Any]) -> TargetConfig:
    def pick(cls, **extra):
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values}, **extra)

    return TargetConfig(pick(RunSettings, destination_settings=_declared_by_destinations(values, "run")),
                        pick(FeederSettings),
                        pick(ConnectionSettings, destination_settings=_declared_by_destinations(values, "worker")))


def load_target_config(path: str | None, env: Mapping[str, str] | None = None,
                       overrides: Mapping[str, Any] | None = None) -> TargetConfig:
    """The feeder's configuration: ``--config`` file, environment, then command-line overrides."""
    env = os.environ if env is None else env
    file_values = read_config_file(path) if path else {}
    values = resolve(file_values, env, f"config file {path}" if path else "defaults")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(settings_by_name()[key], value, "the command line")
    return _split(values)


def load_worker_connection(env: Mapping[str, str] | None = None) -> ConnectionSettings:
    """A worker's own destination connection: file named by SINGER_INGEST_CONFIG, then environment."""
    env = os.environ if env is None else env
    path = env.get(WORKER_CONFIG_ENV)
    file_values = read_config_file(path) if path else {}
    values = resolve(file_values, env, f"config file {path}" if path else "worker environment",
                     scopes=("worker",))
    core = {f.name for f in fields(ConnectionSettings)}
    return ConnectionSettings(**{k: v for k, v in values.items() if k in core},
                              destination_settings=_declared_by_destinations(values, "worker"))
