"""Elasticsearch 7-9 and OpenSearch: the declaration of the destination (no driver imported here; see
``destination.py``)."""

from __future__ import annotations

from ingest.config import Setting

from .. import kit

DESTINATION = kit.DestinationPlugin(
    name="elasticsearch",
    exactness=kit.IDEMPOTENT,
    description="Elasticsearch 7-9 or OpenSearch, an index per stream, loaded through _bulk NDJSON over HTTP: "
                "document ids from the stream's key (or the record's sequence), external versions from the "
                "sequence, the stream's offset written after the documents.",
    factory="sinks.elasticsearch.destination:open_destination",
    settings=(
        Setting("elasticsearch_url", str, None, "worker",
                "http(s)://host:9200 of the elasticsearch destination (Elasticsearch 7-9 or OpenSearch); a "
                "user:password in the URL is used as basic auth.", secret=True),
        Setting("elasticsearch_username", str, None, "worker",
                "User name for basic auth of the elasticsearch destination (with elasticsearch_password)."),
        Setting("elasticsearch_password", str, None, "worker",
                "Password for basic auth of the elasticsearch destination.", secret=True),
        Setting("elasticsearch_api_key", str, None, "worker",
                "API key of the elasticsearch destination (the base64 'encoded' value, sent as Authorization: "
                "ApiKey); instead of basic auth.", secret=True),
        Setting("elasticsearch_ca_file", str, None, "worker",
                "CA certificate bundle (PEM file on the worker) that signs the elasticsearch destination's TLS "
                "certificate; unset: the system's CAs."),
        Setting("elasticsearch_verify_certs", bool, True, "worker",
                "Check the elasticsearch destination's TLS certificate (turn off for a local test server only)."),
        Setting("elasticsearch_index_prefix", str, None, "run",
                "Put in front of each stream's index name (lower case; must start with a letter or digit). "
                "Unset: default_target_schema and a dot, or 'singer_ingest.' when that is unset too."),
        Setting("elasticsearch_bulk_bytes", int, 5_000_000, "run",
                "The elasticsearch destination sends each batch in _bulk requests of about this many bytes."),
        Setting("elasticsearch_data_stream", bool, False, "run",
                "Write each stream to a data stream (an index template and op_type create) instead of an index "
                "behind an alias: append-only, every record a document (keys are not upserted)."),
    ),
    extra="elasticsearch",
    requires=("urllib3",),
    target_setting=None,
)
