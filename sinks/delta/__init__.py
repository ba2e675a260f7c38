"""Delta Lake, on a local folder or S3: the declaration of the destination (no driver imported here; see
``destination.py``)."""

from __future__ import annotations

from ingest.config import Setting

from .. import kit

DESTINATION = kit.DestinationPlugin(
    name="delta",
    exactness=kit.ATOMIC_COMMIT,
    description="Delta Lake tables (deltalake), one per stream, in a local folder or on S3: rows, the stream's "
                "offset and its fencing token in one Delta commit.",
    factory="sinks.delta.destination:open_destination",
    settings=(
        Setting("delta_uri", str, None, "run",
                "Where the delta destination's tables go: a local folder (relative to the feeder's directory) or "
                "s3://bucket/prefix. One Delta table per stream, under the folder default_target_schema names "
                "when set.", path=True),
        Setting("delta_s3_endpoint_url", str, None, "worker",
                "S3 endpoint of the delta destination, for S3-compatible servers (MinIO, a local test server); "
                "unset: AWS."),
        Setting("delta_s3_region", str, None, "worker", "S3 region of the delta destination's bucket (unset: the "
                "worker's AWS_REGION)."),
        Setting("delta_s3_allow_http", bool, False, "worker",
                "Let the delta destination talk to an S3 endpoint over plain http (local servers only)."),
        Setting("delta_s3_access_key_id", str, None, "worker",
                "S3 access key id of the delta destination (unset: the worker's own AWS credentials: "
                "AWS_ACCESS_KEY_ID, profile or instance role).", secret=True),
        Setting("delta_s3_secret_access_key", str, None, "worker",
                "S3 secret access key of the delta destination (unset: the worker's own AWS credentials).",
                secret=True),
        Setting("delta_s3_session_token", str, None, "worker",
                "S3 session token of the delta destination, with temporary credentials.", secret=True),
    ),
    extra="delta",
    requires=("deltalake", "pyarrow"),
    target_setting="delta_uri",
)
