"""DuckDB, the embedded default: the declaration of the destination.

Its driver is imported by ``destination.py`` only, so reading the registry costs the feeder nothing."""

from __future__ import annotations

from ingest.config import Setting

from .. import kit

DESTINATION = kit.DestinationPlugin(
    name="duckdb",
    exactness=kit.TRANSACTIONAL,
    description="An embedded DuckDB database file (the default): nothing else needs to run.",
    factory="sinks.duckdb.destination:open_destination",
    settings=(
        Setting("duckdb_path", str, "singer_ingest.duckdb", "run",
                "DuckDB database file for the duckdb destination (relative to the feeder's directory).", path=True),
    ),
    target_setting="duckdb_path",
)
