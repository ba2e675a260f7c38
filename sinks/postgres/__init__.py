"""PostgreSQL: the declaration of the destination.

Its driver is imported by ``destination.py`` only, so reading the registry costs the feeder nothing."""

from __future__ import annotations

from ingest.config import Setting

from .. import kit

DESTINATION = kit.DestinationPlugin(
    name="postgres",
    exactness=kit.TRANSACTIONAL,
    description="PostgreSQL through COPY, rows and the stream's offset in one transaction.",
    factory="sinks.postgres.destination:open_destination",
    settings=(
        Setting("postgres_dsn", str, None, "worker", "libpq connection string or URL for the postgres destination.",
                secret=True),
        Setting("host", str, None, "worker", "PostgreSQL host."),
        Setting("port", int, None, "worker", "PostgreSQL port."),
        Setting("user", str, None, "worker", "PostgreSQL user."),
        Setting("password", str, None, "worker", "PostgreSQL password.", secret=True),
        Setting("database", str, None, "worker", "PostgreSQL database."),
    ),
)
