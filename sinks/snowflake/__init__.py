"""Snowflake: the declaration of the destination (no driver imported here; see ``destination.py``)."""

from __future__ import annotations

from ingest.config import Setting

from .. import kit

DESTINATION = kit.DestinationPlugin(
    name="snowflake",
    exactness=kit.TRANSACTIONAL,
    description="Snowflake through Parquet files PUT to an internal stage and COPY INTO (MERGE for upserts), rows "
                "and the stream's offset in one transaction.",
    factory="sinks.snowflake.destination:open_destination",
    settings=(
        Setting("snowflake_account", str, None, "worker",
                "Account identifier of the snowflake destination (orgname-accountname, or the account locator "
                "with its region)."),
        Setting("snowflake_user", str, None, "worker", "User the snowflake destination logs in as."),
        Setting("snowflake_password", str, None, "worker",
                "Password of snowflake_user (or use a key pair: snowflake_private_key or "
                "snowflake_private_key_path).", secret=True),
        Setting("snowflake_private_key", str, None, "worker",
                "Private key of snowflake_user for key-pair authentication, as PEM text.", secret=True),
        Setting("snowflake_private_key_path", str, None, "worker",
                "File holding the PEM private key of snowflake_user for key-pair authentication (on the worker's "
                "host)."),
        Setting("snowflake_private_key_passphrase", str, None, "worker",
                "Passphrase of an encrypted private key.", secret=True),
        Setting("snowflake_role", str, None, "worker", "Role of the snowflake destination's sessions (unset: the "
                "user's default role)."),
        Setting("snowflake_warehouse", str, None, "worker",
                "Warehouse the snowflake destination's COPY and MERGE statements run on (unset: the user's default "
                "warehouse)."),
        Setting("snowflake_database", str, None, "worker",
                "Database the snowflake destination's tables go in (created if missing); the schema is "
                "default_target_schema (unset: PUBLIC). Names resolve as Snowflake resolves an identifier: "
                "upper-cased unless quoting would be needed."),
        Setting("snowflake_host", str, None, "worker",
                "Host name of the Snowflake service, for private connectivity or a local test server (unset: the "
                "account's own host)."),
        Setting("snowflake_port", int, 443, "worker", "Port of snowflake_host."),
        Setting("snowflake_protocol", str, "https", "worker",
                "Protocol of snowflake_host: https, or http for a local test server only.", choices=("https", "http")),
    ),
    extra="snowflake",
    requires=("pyarrow",),
    target_setting=None,
)
