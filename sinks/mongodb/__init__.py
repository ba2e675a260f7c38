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
        Setting("mongodb_decimal128", bool, True, "run",
                "Store the values of number properties whose schema gives a decimal scale (multipleOf 0.01, "
                "0.001, ...: decimal columns of the source) as Decimal128, from the shortest decimal text of the "
                "value (19.99 stays 19.99); false: as doubles, for servers without Decimal128."),
    ),
    extra="mongodb",
    requires=("pymongo",),
    target_setting=None,
)
