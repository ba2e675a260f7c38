"""MongoDB: the declaration of the destination (no driver imported here; see ``destination.py``)."""

from __future__ import annotations

from ingest.config import Setting

from .. import kit

DESTINATION = kit.DestinationPlugin(
    name="mongodb",
    exactness=kit.IDEMPOTENT,
    description="MongoDB collections, one per stream, through bulk_write of ReplaceOne upserts: a document's _id "
                "is the record's key (or its _sdc_sequence), so a replayed batch rewrites the same documents; the "
                "stream's offset is written after them.",
    factory="sinks.mongodb.destination:open_destination",
    settings=(
        Setting("mongodb_url", str, None, "worker",
                "mongodb:// or mongodb+srv:// URL of the mongodb destination (credentials and options such as "
                "tls, authSource, replicaSet in it); default_target_schema is the database the collections go "
                "in (unset: the URL's database, else singer_ingest).", secret=True),
    ),
    extra="mongodb",
    requires=("pymongo",),
    target_setting=None,
)
