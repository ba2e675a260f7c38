"""Google BigQuery: the declaration of the destination (no driver imported here; see ``destination.py``)."""

from __future__ import annotations

from ingest.config import Setting

from .. import kit

DESTINATION = kit.DestinationPlugin(
    name="bigquery",
    exactness=kit.ATOMIC_COMMIT,
    description="Google BigQuery (google-cloud-bigquery): each batch loaded as Parquet into a staging table, then "
                "merged or appended with the stream's offset and fencing token in one multi-statement transaction.",
    factory="sinks.bigquery.destination:open_destination",
    settings=(
        Setting("bigquery_project", str, None, "run",
                "Google Cloud project of the bigquery destination (jobs run and tables live there); unset: the "
                "project of the worker's credentials. The dataset is default_target_schema (unset: singer_ingest), "
                "created if missing."),
        Setting("bigquery_location", str, "US", "run",
                "Location of the bigquery destination's dataset and jobs (US, EU, europe-west3, ...)."),
        Setting("bigquery_credentials_path", str, None, "worker",
                "Service-account key file (JSON) of the bigquery destination; unset: bigquery_credentials_json, "
                "else the worker's application default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud, the "
                "metadata server).", secret=True),
        Setting("bigquery_credentials_json", str, None, "worker",
                "Service-account key of the bigquery destination as JSON text (instead of a file).", secret=True),
        Setting("bigquery_api_endpoint", str, None, "worker",
                "BigQuery API endpoint for a local server (http://127.0.0.1:9050); with no credentials set, "
                "requests go unauthenticated. Unset: Google's endpoint."),
    ),
    extra="bigquery",
    requires=("pyarrow",),  # google.cloud.bigquery: the factory's import says which extra is missing
    target_setting="bigquery_project",
)
