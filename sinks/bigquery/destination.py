"""Google BigQuery destination (``google-cloud-bigquery`` 3.x with pyarrow).

Where rows go: one table per stream in the dataset ``default_target_schema`` (unset: ``singer_ingest``; created
if missing, in ``bigquery_location``) of ``bigquery_project``. Table and column names follow the naming rule of
``sinks/names.py`` (300 bytes at most, BigQuery's limit on a column name), which leaves letters, digits and
``_`` only; a column name with a prefix BigQuery reserves (``_TABLE_``, ``_FILE_``, ``_PARTITION``,
``_ROW_TIMESTAMP``, ``__ROOT__``, ``_COLIDENTIFIER``, ``_CHANGE_SEQUENCE_NUMBER``, ``_CHANGE_TYPE``, in any
case) is stored with a leading ``x`` (``_table_id`` -> ``x_table_id``), logged once. Every identifier is
quoted with backticks; values never enter SQL text as text: integers as digits, strings as the hex of their
UTF-8 bytes (``SAFE_CONVERT_BYTES_TO_STRING(FROM_HEX('...'))``), so no input can close a literal.

Load path of a batch (never streaming inserts):
1. the rows as one Parquet file (``Batch.arrow``), loaded with a load job (``load_table_from_file``, no Cloud
   Storage needed) into a staging table of their own, ``_singer_ingest_stage_<uuid>``, made first through the
   tables API (expiring after a day, so a crash leaves nothing for long) and deleted after the commit;
2. one multi-statement transaction (a script) that reads the stream's offset and fencing token from its
   offsets table, refuses a lower fence (``ERROR()``, which rolls the transaction back: ``Fenced``), does
   nothing when the stored offset already covers the batch (a retry of a commit whose answer was lost), and
   otherwise ``MERGE``s the staging rows into the table (keyed streams: a stored row is replaced only by a row
   with an equal or higher ``_sdc_sequence``; the batch holds one row per key, the last by sequence) or
   ``INSERT``s them (keyless streams, append-only; ``overwrite`` deletes the table's rows first), inserts the
   batch's dead letters into ``_singer_ingest_dead_letter`` from their own staging table, and raises the
   offset, then COMMITs.

Why the offset is exact (class (b) of ``sinks/base.py``):
- Nothing lost: the offset moves only in the transaction that writes the rows; either all of it commits or
  none of it (an error anywhere in the script rolls it back).
- Nothing doubled: the check of the stored offset is inside the transaction. A retry of a batch that did
  commit finds its offset stored and writes nothing (``base.committed_before`` logs it). BigQuery runs a
  transaction on a snapshot and aborts it at commit when another transaction changed a table it changed
  meanwhile ("Transaction is aborted due to concurrent update"): two attempts of one batch can never both
  commit, the later one is aborted, retried, and then finds the offset. Each job's id is chosen before it is
  sent (the operation, a digest of run, stream, offset and fence, and a random part per attempt): the client
  library resends a ``jobs.insert`` whose answer it did not get with the same id, and a 409 for that id means
  the job exists already, so this module waits for that job's result instead of running the script again.
- Fenced: ``claim_stream`` is a transaction of its own that raises the fence in the offsets table; a stale
  owner's transaction either reads the new fence and refuses itself, or ran concurrently with the claim and is
  aborted at commit (both change the offsets table), retried, and then refuses itself.
- Each stream has its own offsets table, ``_singer_ingest_offsets__<table>`` (run_id, stream, offset, fence),
  so that the transactions of different streams never touch one table and never abort each other; the
  dead-letter table shared by all streams only receives INSERTs, which BigQuery does not count as conflicts.

Types: integer INT64, number FLOAT64, string STRING, boolean BOOL, date-time TIMESTAMP (UTC, microseconds),
date DATE, time TIME, JSON JSON (objects, arrays and anything of several types; loaded as text into the staging
table and turned into JSON by ``PARSE_JSON(..., wide_number_mode => 'round')``, so a number wider than a double
is rounded rather than refused).

Schema evolution never drops a column. New columns go in through the tables API (``tables.patch`` of the
schema, NULLABLE), followed by ``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` for each, which BigQuery answers
as a no-op once the tables API added it (a local server that keeps the schema and the storage apart needs
both). A widened type (integer to number, anything to string or JSON) rewrites the table with
``CREATE OR REPLACE TABLE ... AS SELECT`` converting the column (integers to FLOAT64: each value a double
holds; strings to JSON strings with ``TO_JSON``; other values to their text), then sets the schema through the
tables API again. A rewrite reads and writes the whole table, once per widened schema, and does not keep
table options set by hand (partitioning, clustering, descriptions).

Errors: throttling, server errors, lost connections and aborted transactions (concurrent update) are
transient and retried with backoff; a refused value or statement fails the run naming the stream (and the
input line when the batch holds one row). Credentials are worker settings, never logged and never in an
error message.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, DestinationError, Fenced

from .. import base
from ..base import Batch, Column, TableSpec
from ..columnar import arrow_table
from ..names import normalise
from ..retry import with_retries

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "singer_ingest"
MAX_IDENTIFIER_BYTES = 300            # BigQuery's limit on a column name
OFFSETS_PREFIX = "_singer_ingest_offsets__"
STAGE_PREFIX = "_singer_ingest_stage_"
STAGE_EXPIRY = timedelta(days=1)
JOB_PREFIX = "singer_ingest_"
FENCED_MARK = "singer-ingest fenced"
RESERVED_PREFIXES = ("_table_", "_file_", "_partition", "_row_timestamp", "__root__", "_colidentifier",
                     "_change_sequence_number", "_change_type")

TYPES = {
    base.INTEGER: "INT64", base.NUMBER: "FLOAT64", base.STRING: "STRING", base.BOOLEAN: "BOOL",
    base.TIMESTAMP: "TIMESTAMP", base.DATE: "DATE", base.TIME: "TIME", base.JSON: "JSON",
}
# BigQuery's type names (standard and legacy, as the tables API and INFORMATION_SCHEMA give them) as logical types.
LOGICAL = {
    "INT64": base.INTEGER, "INTEGER": base.INTEGER, "FLOAT64": base.NUMBER, "FLOAT": base.NUMBER,
    "NUMERIC": base.NUMBER, "BIGNUMERIC": base.NUMBER, "DECIMAL": base.NUMBER, "BIGDECIMAL": base.NUMBER,
    "STRING": base.STRING, "BOOL": base.BOOLEAN, "BOOLEAN": base.BOOLEAN, "TIMESTAMP": base.TIMESTAMP,
    "DATETIME": base.TIMESTAMP, "DATE": base.DATE, "TIME": base.TIME, "JSON": base.JSON,
}
# Reasons of BigQuery errors that a retry may get past.
TRANSIENT_REASONS = {"backendError", "internalError", "rateLimitExceeded", "jobRateLimitExceeded",
                     "jobBackendError", "jobInternalError", "tableUnavailable", "resourcesExceeded"}
TRANSIENT_WORDS = ("concurrent update", "could not serialize", "aborted due to concurrent", "timed out",
                   "timeout", "temporarily", "connection reset", "connection aborted", "remote end closed",
                   "broken pipe")
TRANSIENT_EXCEPTIONS = (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.TooManyRequests,
                        gexc.GatewayTimeout, gexc.BadGateway, gexc.RetryError, gexc.DeadlineExceeded,
                        ConnectionError, TimeoutError)


def quote(ident: str) -> str:
    """Quote an identifier for BigQuery: backticks, a backslash or backtick inside escaped with a backslash.
    Every identifier goes through here."""
    return "`" + ident.replace("\\", "\\\\").replace("`", "\\`") + "`"


def string_value(value: str) -> str:
    """A string value as a SQL expression that holds no text of it: the hex of its UTF-8 bytes."""
    return f"SAFE_CONVERT_BYTES_TO_STRING(FROM_HEX('{value.encode().hex()}'))"


def int_value(value: int) -> str:
    return str(int(value))


def column_name(name: str) -> str:
    """A normalised column name BigQuery accepts: names with a reserved prefix get a leading ``x``."""
    return "x" + name if name.lower().startswith(RESERVED_PREFIXES) else name


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> "BigQueryDestination":
    return BigQueryDestination(project=run.option("bigquery_project"), dataset=run.default_target_schema,
                               location=run.option("bigquery_location"),
                               credentials_path=connection.option("bigquery_credentials_path"),
                               credentials_json=connection.option("bigquery_credentials_json"),
                               api_endpoint=connection.option("bigquery_api_endpoint"))


def _credentials(path: str | None, text: str | None, endpoint: str | None):
    from google.oauth2 import service_account

    try:
        if text:
            return service_account.Credentials.from_service_account_info(orjson.loads(text))
        if path:
            return service_account.Credentials.from_service_account_file(path)
    except (OSError, ValueError, KeyError, orjson.JSONDecodeError) as exc:
        what = "bigquery_credentials_json" if text else f"bigquery_credentials_path ({path})"
        raise ConfigError(f"the bigquery destination cannot read the service-account key in {what}: "
                          f"{type(exc).__name__}; give a service account's JSON key") from None
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    return None  # application default credentials, found by the client


class BigQueryDestination(base.Destination):
    max_identifier_bytes = MAX_IDENTIFIER_BYTES

    def __init__(self, *, project: str | None, dataset: str | None, location: str | None = "US",
                 credentials_path: str | None = None, credentials_json: str | None = None,
                 api_endpoint: str | None = None, retry_deadline_seconds: float = 300.0):
        self.location = location or "US"
        self.retry_deadline_seconds = retry_deadline_seconds
        if not project and api_endpoint and not (credentials_path or credentials_json):
            raise ConfigError("the bigquery destination needs bigquery_project with bigquery_api_endpoint (a local "
                              "server's requests carry no credentials to take a project from)")
        self._credentials = _credentials(credentials_path, credentials_json, api_endpoint)
        self._endpoint = api_endpoint
        self._project = project
        self._local = threading.local()
        self._clients: list[bigquery.Client] = []  # every thread's, closed by ``close``
        self._clients_lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()
        client = self._client()
        self.project = client.project
        if not self.project:
            raise ConfigError("the bigquery destination needs bigquery_project: the worker's credentials name no "
                              "project")
        self.dataset = normalise(dataset or DEFAULT_DATASET, 1024)
        ds = bigquery.Dataset(f"{self.project}.{self.dataset}")
        ds.location = self.location
        self._call(None, f"create dataset {self.dataset}", lambda: client.create_dataset(ds, exists_ok=True))

    # -- helpers -----------------------------------------------------------------------------------
    def _client(self) -> bigquery.Client:
        """One client per thread (drain threads each use their own HTTP session)."""
        client = getattr(self._local, "client", None)
        if client is None:
            from google.api_core.client_options import ClientOptions
            from google.auth.exceptions import DefaultCredentialsError

            options = ClientOptions(api_endpoint=self._endpoint) if self._endpoint else None
            try:
                client = bigquery.Client(project=self._project, credentials=self._credentials,
                                         location=self.location, client_options=options)
            except DefaultCredentialsError:
                raise ConfigError("the bigquery destination found no credentials: set bigquery_credentials_path "
                                  "(a service-account key file) in the worker's config, or give the worker "
                                  "application default credentials (GOOGLE_APPLICATION_CREDENTIALS)") from None
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def ref(self, table: str) -> str:
        return f"{self.project}.{self.dataset}.{table}"

    def sql_ref(self, table: str) -> str:
        return f"{quote(self.project)}.{quote(self.dataset)}.{quote(table)}"

    def _call(self, stream: str | None, what: str, fn: Callable[[], Any]) -> Any:
        def attempt():
            try:
                return fn()
            except (gexc.GoogleAPIError, ConnectionError, TimeoutError, OSError) as exc:
                raise _translate(exc, stream) from exc

        return with_retries(attempt, what=what, deadline_seconds=self.retry_deadline_seconds)

    def _script(self, sql: str, op: str) -> list[dict]:
        """Run a script (one job) and return its last statement's rows. ``op`` plus an attempt number is the job's
        id: a resent ``jobs.insert`` of the same attempt finds its job (409) and waits for it instead of running
        the script twice."""
        client = self._client()
        job_id = f"{op}_{uuid.uuid4().hex[:12]}"
        try:
            job = client.query(sql, job_id=job_id, job_retry=None, location=self.location)
        except gexc.Conflict:
            job = client.get_job(job_id, location=self.location)
        return [dict(row) for row in job.result(job_retry=None)]

    @staticmethod
    def _op(kind: str, *parts: Any) -> str:
        digest = hashlib.sha256(orjson.dumps([str(p) for p in parts])).hexdigest()[:24]
        return f"{JOB_PREFIX}{kind}_{digest}"

    def _offsets(self, stream: str) -> str:
        return OFFSETS_PREFIX + normalise(stream, MAX_IDENTIFIER_BYTES)

    def _ensure_offsets(self, stream: str) -> str:
        table = self._offsets(stream)
        schema = [bigquery.SchemaField("run_id", "STRING"), bigquery.SchemaField("stream", "STRING"),
                  bigquery.SchemaField("offset", "INT64"), bigquery.SchemaField("fence", "INT64")]
        self._client().create_table(bigquery.Table(self.ref(table), schema=schema), exists_ok=True)
        return table

    def _transaction(self, stream: str, run_id: str, fence: int, body: list[str], *, upto: int | None,
                     op: str) -> tuple[int, int]:
        """The transaction every commit runs: read and check the stream's offset and fence, then (when ``upto``
        is above the stored offset, or for a claim: always) ``body`` and the offsets row. Returns the stored
        (offset, fence) it read."""
        offsets = self.sql_ref(self._offsets(stream))
        run, name = string_value(run_id), string_value(stream)
        where = f"run_id = {run} AND stream = {name}"
        new_offset = "stored_offset" if upto is None else int_value(upto)
        fence_sql = int_value(fence)
        write_offsets = (
            f"MERGE {offsets} AS o USING (SELECT {run} AS run_id, {name} AS stream) AS n "
            f"ON o.run_id = n.run_id AND o.stream = n.stream "
            f"WHEN MATCHED THEN UPDATE SET `offset` = {new_offset}, fence = {fence_sql} "
            f"WHEN NOT MATCHED THEN INSERT (run_id, stream, `offset`, fence) "
            f"VALUES (n.run_id, n.stream, {new_offset}, {fence_sql});")
        statements = [*body, write_offsets]
        apply = "\n".join(statements) if upto is None else \
            f"IF stored_offset < {int_value(upto)} THEN\n" + "\n".join(statements) + "\nEND IF;"
        sql = (
            "DECLARE stored_offset INT64 DEFAULT 0;\n"
            "DECLARE stored_fence INT64 DEFAULT 0;\n"
            "BEGIN TRANSACTION;\n"
            f"SET stored_offset = (SELECT IFNULL(MAX(`offset`), 0) FROM {offsets} WHERE {where});\n"
            f"SET stored_fence = (SELECT IFNULL(MAX(fence), 0) FROM {offsets} WHERE {where});\n"
            f"IF stored_fence > {fence_sql} THEN\n"
            f"  SELECT ERROR(FORMAT('{FENCED_MARK}: another worker took this stream over (fence %d > %d)', "
            f"stored_fence, {fence_sql}));\n"
            "END IF;\n"
            f"{apply}\n"
            "COMMIT TRANSACTION;\n"
            "SELECT stored_offset, stored_fence;")
        (row,) = self._script(sql, op)
        return int(row["stored_offset"] or 0), int(row["stored_fence"] or 0)

    # -- tables ------------------------------------------------------------------------------------
    def _existing(self, spec: TableSpec) -> TableSpec | None:
        try:
            table = self._client().get_table(self.ref(spec.table))
        except gexc.NotFound:
            return None
        cols = tuple(Column(f.name, None, LOGICAL.get((f.field_type or "").upper(), base.STRING))
                     for f in table.schema)
        return TableSpec(spec.stream, spec.table, spec.schema_name, cols, spec.key_columns, spec.metadata)

    @staticmethod
    def _field(c: Column) -> bigquery.SchemaField:
        return bigquery.SchemaField(c.name, TYPES[c.type], mode="NULLABLE")

    def _bq_spec(self, spec: TableSpec) -> TableSpec:
        """The spec with column names BigQuery accepts (``column_name``)."""
        renamed = {c.name: column_name(c.name) for c in spec.columns}
        changed = {old: new for old, new in renamed.items() if old != new}
        if not changed:
            return spec
        taken = set(renamed.values())
        if len(taken) != len(renamed):
            raise DestinationError(f"columns {', '.join(changed)} start with a prefix BigQuery reserves and their "
                                   f"new names ({', '.join(changed.values())}) collide with other columns; rename "
                                   f"the properties", transient=False, stream=spec.stream)
        for old, new in changed.items():
            if (spec.stream, old) not in self._warned:
                self._warned.add((spec.stream, old))
                logger.warning("stream %r: column %s starts with a prefix BigQuery reserves; stored as %s",
                               spec.stream, old, new)
        cols = tuple(Column(renamed[c.name], c.prop, c.type) for c in spec.columns)
        return TableSpec(spec.stream, spec.table, spec.schema_name, cols,
                         tuple(renamed[k] for k in spec.key_columns), spec.metadata)

    def ensure_table(self, spec: TableSpec) -> TableSpec:
        spec = self._bq_spec(spec)
        for k in spec.key_columns:
            if next(c for c in spec.columns if c.name == k).type == base.JSON:
                raise DestinationError(f"key property {k!r} is an object, an array or of several types; BigQuery "
                                       f"cannot compare JSON values, so it cannot be a key", transient=False,
                                       stream=spec.stream)

        def fn() -> TableSpec:
            client = self._client()
            self._ensure_offsets(spec.stream)
            existing = self._existing(spec)
            if existing is None:
                client.create_table(bigquery.Table(self.ref(spec.table), schema=[self._field(c) for c in spec.columns]),
                                    exists_ok=True)
                existing = self._existing(spec)
                if existing is None:
                    raise DestinationError(f"table {spec.table} was not there right after it was created; trying "
                                           f"again", transient=True, stream=spec.stream)
                if existing.column_names == spec.column_names:
                    logger.info("stream %r: created table %s.%s", spec.stream, self.dataset, spec.table)
                    return spec
            merged, add, change = base.merge_specs(existing, spec)
            if change:
                self._rewrite(existing, merged)
                for c in change:
                    logger.info("stream %r: widened column %s to %s (table rewritten)", spec.stream, c.name,
                                TYPES[c.type])
            elif add:
                self._add_columns(merged, add)
                for c in add:
                    logger.info("stream %r: added column %s %s", spec.stream, c.name, TYPES[c.type])
            return merged

        return self._call(spec.stream, f"set up table for stream {spec.stream!r}", fn)

    def _set_schema(self, spec: TableSpec) -> None:
        client = self._client()
        table = client.get_table(self.ref(spec.table))
        table.schema = [self._field(c) for c in spec.columns]
        client.update_table(table, ["schema"])

    def _add_columns(self, merged: TableSpec, add: list[Column]) -> None:
        self._set_schema(merged)
        # One statement per column, in one script: some servers take one ADD COLUMN per ALTER TABLE.
        adds = "\n".join(f"ALTER TABLE {self.sql_ref(merged.table)} ADD COLUMN IF NOT EXISTS {quote(c.name)} "
                         f"{TYPES[c.type]};" for c in add)
        self._client().query(adds, job_retry=None, location=self.location).result(job_retry=None)

    def _rewrite(self, existing: TableSpec, merged: TableSpec) -> None:
        old = {c.name: c.type for c in existing.columns}
        exprs = []
        for c in merged.columns:
            q = quote(c.name)
            if c.name not in old:
                exprs.append(f"CAST(NULL AS {TYPES[c.type]}) AS {q}")
            elif old[c.name] == c.type:
                exprs.append(q)
            elif c.type == base.JSON:
                exprs.append(f"TO_JSON({q}) AS {q}")
            else:
                exprs.append(f"CAST({q} AS {TYPES[c.type]}) AS {q}")
        self._client().query(f"CREATE OR REPLACE TABLE {self.sql_ref(merged.table)} AS SELECT {', '.join(exprs)} "
                             f"FROM {self.sql_ref(merged.table)}", job_retry=None,
                             location=self.location).result(job_retry=None)
        self._set_schema(merged)

    # -- staging -----------------------------------------------------------------------------------
    def _stage(self, spec: TableSpec, data: pa.Table) -> str:
        """Load ``data`` into a new staging table (JSON columns as text); return its name."""
        client = self._client()
        name = f"{STAGE_PREFIX}{uuid.uuid4().hex}"
        table = bigquery.Table(self.ref(name), schema=[
            bigquery.SchemaField(c.name, "STRING" if c.type == base.JSON else TYPES[c.type]) for c in spec.columns])
        table.expires = datetime.now(timezone.utc) + STAGE_EXPIRY
        client.create_table(table)
        buf = io.BytesIO()
        pq.write_table(data, buf, compression="snappy")
        buf.seek(0)
        config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET,
                                        write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
        job_id = f"{JOB_PREFIX}load_{name[len(STAGE_PREFIX):]}"
        try:
            job = client.load_table_from_file(buf, self.ref(name), job_id=job_id, job_config=config,
                                              location=self.location, rewind=True)
        except gexc.Conflict:  # the same upload, sent again by the client library: its job exists already
            job = client.get_job(job_id, location=self.location)
        job.result()
        return name

    def _drop(self, name: str) -> None:
        try:
            self._client().delete_table(self.ref(name), not_found_ok=True)
        except (gexc.GoogleAPIError, ConnectionError, TimeoutError) as exc:
            logger.warning("could not delete staging table %s (%s); it expires within a day", name,
                           type(exc).__name__)

    @staticmethod
    def _value_sql(c: Column, source: str) -> str:
        col = f"{source}.{quote(c.name)}"
        return f"PARSE_JSON({col}, wide_number_mode => 'round')" if c.type == base.JSON else col

    def _rows_sql(self, spec: TableSpec, stage: str, keyed: bool, truncate: bool) -> list[str]:
        target, source = self.sql_ref(spec.table), self.sql_ref(stage)
        names = ", ".join(quote(c.name) for c in spec.columns)
        values = ", ".join(self._value_sql(c, "s") for c in spec.columns)
        out = [f"DELETE FROM {target} WHERE TRUE;"] if truncate else []
        if not keyed:
            out.append(f"INSERT INTO {target} ({names}) SELECT {values} FROM {source} AS s;")
            return out
        on = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in spec.key_columns)
        guard = ""
        if spec.metadata:
            seq = quote(base.SEQUENCE_COLUMN)
            guard = f" AND (t.{seq} IS NULL OR s.{seq} >= t.{seq})"
        sets = ", ".join(f"{quote(c.name)} = {self._value_sql(c, 's')}" for c in spec.columns
                         if c.name not in spec.key_columns)
        matched = f"WHEN MATCHED{guard} THEN UPDATE SET {sets} " if sets else ""
        out.append(f"MERGE {target} AS t USING {source} AS s ON {on} {matched}"
                   f"WHEN NOT MATCHED THEN INSERT ({names}) VALUES ({values});")
        return out

    # -- the interface -----------------------------------------------------------------------------
    def claim_stream(self, run_id: str, stream: str, fence: int) -> int:
        op = self._op("claim", run_id, stream, fence)

        def fn() -> int:
            self._ensure_offsets(stream)
            return self._transaction(stream, run_id, fence, [], upto=None, op=op)[0]

        return self._call(stream, f"claim stream {stream!r}", fn)

    def write_batch(self, spec: TableSpec, batch: Batch) -> None:
        keyed = batch.upsert and bool(spec.key_columns)
        base.require_keys(spec, batch)
        op = self._op("batch", batch.run_id, spec.stream, batch.upto_seq, batch.fence)

        def fn() -> None:
            stages: list[str] = []
            try:
                body: list[str] = []
                if batch.rows:
                    stage = self._stage(spec, self._data(spec, batch, keyed))
                    stages.append(stage)
                    body += self._rows_sql(spec, stage, keyed, batch.truncate_first)
                elif batch.truncate_first:
                    body.append(f"DELETE FROM {self.sql_ref(spec.table)} WHERE TRUE;")
                if batch.dead_letters:
                    body += self._dead_letters_sql(spec, batch, stages)
                stored, _ = self._transaction(spec.stream, batch.run_id, batch.fence, body, upto=batch.upto_seq,
                                              op=op)
                base.committed_before(stored, spec.stream, batch.upto_seq, batch.has_writes)
            finally:
                for stage in stages:
                    self._drop(stage)

        self._call(spec.stream, f"write batch of stream {spec.stream!r}", self._with_line(fn, batch))

    @staticmethod
    def _with_line(fn: Callable[[], None], batch: Batch) -> Callable[[], None]:
        """A refused batch of one row names that row's input line."""
        def wrapped() -> None:
            try:
                fn()
            except DestinationError as exc:
                if exc.line is None and not exc.transient and len(batch.lines) == 1:
                    raise DestinationError(exc.what, transient=False, stream=exc.stream,
                                           line=batch.lines[0]) from exc
                raise

        return wrapped

    def _dead_letters_sql(self, spec: TableSpec, batch: Batch, stages: list[str]) -> list[str]:
        dl = base.dead_letter_spec(spec.schema_name)
        client = self._client()
        client.create_table(bigquery.Table(self.ref(dl.table), schema=[self._field(c) for c in dl.columns]),
                            exists_ok=True)
        # failed_at as ISO text (as the worker gives date-times) or as a datetime: both load.
        rows = [tuple(v.isoformat() if isinstance(v, datetime) else v for v in row) for row in batch.dead_letters]
        stage = self._stage(dl, arrow_table(dl, rows))
        stages.append(stage)
        return self._rows_sql(dl, stage, keyed=False, truncate=False)

    @staticmethod
    def _data(spec: TableSpec, batch: Batch, keyed: bool) -> pa.Table:
        if keyed:
            rows, _ = base.last_by_sequence(spec, batch.rows, batch.lines)
            if rows is not batch.rows:  # a key twice in the batch: the MERGE takes one row per key
                return arrow_table(spec, rows)
        return batch.arrow(spec)

    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None:
        body: list[str] = []
        if not spec.metadata:
            logger.warning("stream %r: ACTIVATE_VERSION ignored: add_record_metadata is off, so rows carry "
                           "no _sdc_table_version", spec.stream)
        else:
            target = self.sql_ref(spec.table)
            ver, deleted = quote(base.VERSION_COLUMN), quote(base.DELETED_COLUMN)
            older = f"({ver} IS NULL OR {ver} < {int_value(version)})"
            if hard_delete:
                body.append(f"DELETE FROM {target} WHERE {older};")
            else:
                when = datetime.fromisoformat(deleted_at.replace("Z", "+00:00"))
                when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
                micros = int_value(round(when.timestamp() * 1_000_000))
                body.append(f"UPDATE {target} SET {deleted} = TIMESTAMP_MICROS({micros}) "
                            f"WHERE {older} AND {deleted} IS NULL;")
        op = self._op("activate", run_id, spec.stream, upto_seq, fence)
        self._call(spec.stream, f"activate version {version} of stream {spec.stream!r}",
                   lambda: self._transaction(spec.stream, run_id, fence, body, upto=upto_seq, op=op))

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()


_REASON = re.compile(r"reason: (\w+)")


def _reasons(exc: BaseException) -> set[str]:
    out = {e.get("reason") for e in (getattr(exc, "errors", None) or []) if isinstance(e, dict)}
    out.update(_REASON.findall(str(exc)))
    return {r for r in out if r}


def _translate(exc: BaseException, stream: str | None) -> Exception:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    text = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    if FENCED_MARK in message:
        return Fenced(f"stream {stream!r}: {text[text.index(FENCED_MARK) + len(FENCED_MARK) + 2:]}"
                      if f"{FENCED_MARK}: " in text else f"stream {stream!r}: another worker took this stream over")
    lowered = message.lower()
    if isinstance(exc, (gexc.Unauthorized, gexc.Forbidden)) and not (_reasons(exc) & TRANSIENT_REASONS):
        return DestinationError(f"BigQuery refused the worker's credentials ({text}); check "
                                f"bigquery_credentials_path and the account's roles (BigQuery Data Editor and Job "
                                f"User on the project)", transient=False, stream=stream)
    transient = isinstance(exc, TRANSIENT_EXCEPTIONS) or bool(_reasons(exc) & TRANSIENT_REASONS) or \
        any(w in lowered for w in TRANSIENT_WORDS)
    return DestinationError(f"BigQuery: {text}", transient=transient, stream=stream)
