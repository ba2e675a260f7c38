"""MySQL and MariaDB: the declaration of the destination (no driver imported here; see ``destination.py``)."""

from __future__ import annotations

from ingest.config import Setting

from .. import kit

DESTINATION = kit.DestinationPlugin(
    name="mysql",
    exactness=kit.TRANSACTIONAL,
    description="MySQL 8 or MariaDB 10.11+ (InnoDB) through LOAD DATA LOCAL INFILE, rows and the stream's offset "
                "in one transaction.",
    factory="sinks.mysql.destination:open_destination",
    settings=(
        Setting("mysql_url", str, None, "worker",
                "mysql://user:password@host:port/ of the mysql destination; default_target_schema is the database "
                "the tables go in (created if missing; unset: the URL's database, else singer_ingest).", secret=True),
    ),
    extra="mysql",
    requires=("pymysql",),
    target_setting=None,
)
