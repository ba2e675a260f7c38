"""Destinations behind one interface (``sinks.base.Destination``); one module per destination."""

from __future__ import annotations

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError

from .base import Destination


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> Destination:
    """Open the destination a run names, with the worker's own connection settings."""
    if run.destination == "duckdb":
        from .duckdb import DuckDBDestination

        return DuckDBDestination(run.duckdb_path, run.default_target_schema, shared_file=not embedded)
    if run.destination == "postgres":
        from .postgres import PostgresDestination

        # One connection per drain thread, and one for the worker's own loop (claims, table set-up).
        return PostgresDestination.from_settings(connection, run.default_target_schema,
                                                 max_connections=run.max_parallelism + 1)
    raise ConfigError(f"unknown destination {run.destination!r}")
