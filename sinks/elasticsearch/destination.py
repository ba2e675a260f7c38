"""Elasticsearch 7-9 and OpenSearch destination: ``_bulk`` NDJSON over plain HTTP (urllib3).

Why plain HTTP: the elasticsearch-py 8 client sends ``Accept: application/vnd.elasticsearch+json;
compatible-with=8``, which OpenSearch refuses (and it refuses a server that does not say it is Elasticsearch),
and opensearch-py is made for OpenSearch. The few endpoints used here (``_bulk``, ``_mapping``, ``_aliases``,
``_reindex``, ``_delete_by_query``, ``_search``, ``_doc``) speak the same JSON on Elasticsearch 7, 8, 9 and
OpenSearch 1-3, so one thread-safe urllib3 pool serves them all.

Where documents go: an index per stream, named ``<prefix><table>`` (the table name by ``sinks/names.py``; the
prefix is ``elasticsearch_index_prefix``, else ``<default_target_schema>.``, else ``singer_ingest.``). That name
is an alias of a concrete index ``<prefix><table>-000001`` (a later generation after a type change or an
``overwrite`` load, below). A name that already is a plain index (made elsewhere) is written as it is. With
``elasticsearch_data_stream`` the name is a data stream instead, made from an index template of the same name.

Mappings from the JSON schema: integer ``long``, number ``double``, string ``keyword`` (``ignore_above`` 8191
characters: a longer value is kept in ``_source`` and not indexed, rather than refused), boolean ``boolean``,
date-time and date ``date`` (ISO 8601; ``_source`` keeps the value as written, microseconds included), time
``keyword``, and JSON (objects, arrays, mixed types) ``object`` with ``enabled: false``: kept in ``_source`` and
returned as it came, not indexed, so any JSON value fits and a tap's free-form objects never explode the
mapping. Mappings are ``dynamic: strict``. Each field's logical type is kept in the mapping's ``_meta``
(``singer_ingest.columns``), so a JSON field is told from an object and a time from a string. Schema evolution
never drops a field: new fields are added to the mapping; a type that widens (integer to number, anything to
string or JSON), which Elasticsearch cannot change in place, makes the next generation of the index with the
merged mapping, copies the documents into it with ``_reindex`` (versions kept: ``version_type: external``),
moves the alias in one ``_aliases`` call and deletes the old index. ``_source`` keeps each value as written
(an integer stays an integer in a field that now is a double).

How the rules are kept (class (c), idempotent; ``sinks/base.py``):

- Document ids: the key properties' values (one key: its text; several: their JSON array text; an id longer than
  Elasticsearch's 512 bytes: ``sha256:`` and its hash); a keyless stream, an ``append-only`` load and a data
  stream use the record's sequence (``Batch.sequences``: the run's sequence base plus its input line, unique
  across runs). A redelivered batch therefore writes the same ids.
- Versions: every document is written with ``version_type: external_gte`` and ``version`` = its sequence. A
  write carrying a lower sequence than the stored document is refused by the server (409), which this module
  counts as done: a late write of a stale owner, or of a batch replayed after a newer one, never brings back an
  older record; a replay of the same record (same sequence) rewrites the same document.
- The offset: one document per (run, stream) in ``<prefix>_singer_ingest_offsets`` holding (offset, fence),
  changed only by compare-and-set (``if_seq_no``/``if_primary_term``). ``claim_stream`` raises the fence there;
  ``write_batch`` reads it first (a stale fence: ``Fenced`` before any document is written), skips a batch the
  offset covers (``base.committed_before``), writes the dead letters, then the documents, and only then moves
  the offset, by compare-and-set again, refusing a fence raised meanwhile (``Fenced``).
- Lost: nothing; the offset moves after every document of the batch was acknowledged by the server, each
  ``_bulk`` item's result checked (a refused item fails the run naming its input line; an item the server
  could not take for now, 429 or 5xx, is sent again with backoff). Doubled: nothing; a replay rewrites the
  same ids. STATE: released by the worker only after ``write_batch`` returned.
- What this class cannot give: a reader may see a batch half written, and a stale owner's documents written
  before it noticed its lease was gone stay (they are records of the same input, versioned by sequence, and
  the new owner rewrites them). Data streams are append-only (``create``: an id already there is a 409,
  counted as written); a replay that lands after a rollover of the data stream writes into the new backing
  index, where the id is not known: the one case where a document can be doubled.

ACTIVATE_VERSION: hard, ``_delete_by_query`` of the documents of older versions; soft, the documents of older
versions without ``_sdc_deleted_at`` are searched and updated in ``_bulk`` requests of ``update`` actions
(compare-and-set on each), until none is left; both after a ``_refresh`` so the search sees every document.
Both carry the offset as ``write_batch`` does.

Dead letters go to the index of ``base.dead_letter_spec`` (``<prefix>_singer_ingest_dead_letter``), id
``<stream>/<_sdc_sequence>``, versioned by the sequence, before the batch's documents and its offset.

Errors: a connection that fails, 429 and 502-504 are transient (retried with backoff); 401 and 403 name the
credentials settings; any other refusal fails the run with Elasticsearch's own reason, the stream and, for a
document, its input line. The URL's user info, the password and the API key are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import re
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable
from urllib.parse import quote as url_quote, urlsplit, urlunsplit, unquote

import orjson
import urllib3
import urllib3.exceptions

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, DestinationError, Fenced

from .. import base
from ..base import Batch, Column, TableSpec
from ..names import normalise
from ..retry import with_retries

logger = logging.getLogger(__name__)

MAX_IDENTIFIER_BYTES = 128
MAX_PREFIX_BYTES = 100
MAX_ID_BYTES = 512
OFFSETS_TABLE = "_singer_ingest_offsets"
META_KEY = "singer_ingest"
GENERATION = re.compile(r"-(\d{6})\Z")
DEFAULT_PREFIX = "singer_ingest."
_PREFIX_OK = re.compile(r"[a-z0-9][a-z0-9_.\-]*\Z")
KEYWORD_CHARS = 8191  # ignore_above: 4 bytes a character stays under Lucene's 32766-byte term limit
SEARCH_PAGE = 1000
REQUEST_SECONDS = 120.0
REINDEX_SECONDS = 3600.0
TRANSIENT_STATUS = {429, 502, 503, 504}

MAPPING = {
    base.INTEGER: {"type": "long"},
    base.NUMBER: {"type": "double"},
    base.STRING: {"type": "keyword", "ignore_above": KEYWORD_CHARS},
    base.BOOLEAN: {"type": "boolean"},
    base.TIMESTAMP: {"type": "date", "format": "strict_date_optional_time||epoch_millis"},
    base.DATE: {"type": "date", "format": "strict_date_optional_time||epoch_millis"},
    base.TIME: {"type": "keyword", "ignore_above": KEYWORD_CHARS},
    base.JSON: {"type": "object", "enabled": False},
}
# An index made elsewhere (no logical types in its _meta): its field types read as logical types.
LOGICAL = {
    "long": base.INTEGER, "integer": base.INTEGER, "short": base.INTEGER, "byte": base.INTEGER,
    "unsigned_long": base.INTEGER, "double": base.NUMBER, "float": base.NUMBER, "half_float": base.NUMBER,
    "scaled_float": base.NUMBER, "keyword": base.STRING, "text": base.STRING, "wildcard": base.STRING,
    "boolean": base.BOOLEAN, "date": base.TIMESTAMP, "date_nanos": base.TIMESTAMP,
}
# Elasticsearch's and OpenSearch's metadata fields, which a document cannot hold: a column of that name (a property
# "_id", say) is stored as a field of that name with "_" after it.
RESERVED_FIELDS = frozenset({
    "_id", "_index", "_source", "_routing", "_version", "_seq_no", "_primary_term", "_type", "_uid", "_parent",
    "_field_names", "_ignored", "_ignored_source", "_tier", "_doc_count", "_data_stream_timestamp", "_size",
    "_meta", "_all", "_timestamp", "_ttl", "_nested_path", "_feature", "_tsid", "_routing_path",
    "_inference_fields", "_data_stream", "_recovery_source", "_recovery_source_size", "_seq_no_primary_term"})
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?\Z")


# -- HTTP ---------------------------------------------------------------------------------------------------------
class Http:
    """A thread-safe urllib3 pool for one cluster. ``request`` returns (status, parsed JSON body); a failed
    connection is a transient ``DestinationError``; what to do with a status is the caller's business."""

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 api_key: str | None = None, ca_file: str | None = None, verify_certs: bool = True,
                 pool_size: int = 10):
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ConfigError("elasticsearch_url must look like https://host:9200 (user:password@ optional)") \
                from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("elasticsearch_url must look like https://host:9200 (user:password@ optional)")
        if parts.username and not username:
            username, password = unquote(parts.username), unquote(parts.password or "")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        netloc = f"{host}:{port}" if port else host
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.where = netloc  # what messages say: never the user info
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"ApiKey {api_key}"
        elif username:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        kwargs: dict[str, Any] = {}
        if parts.scheme == "https":
            kwargs["cert_reqs"] = "CERT_REQUIRED" if verify_certs else "CERT_NONE"
            if ca_file:
                kwargs["ca_certs"] = ca_file
            if not verify_certs:
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=pool_size, block=True, retries=False, **kwargs)

    def request(self, method: str, path: str, body: Any = None, *, ndjson: bytes | None = None,
                timeout: float = REQUEST_SECONDS, stream: str | None = None) -> tuple[int, Any]:
        headers = self.headers
        if ndjson is not None:
            data: bytes | None = ndjson
            headers = {**headers, "Content-Type": "application/x-ndjson"}
        else:
            data = None if body is None else orjson.dumps(body)
        try:
            resp = self.pool.request(method, self.base + path, body=data, headers=headers,
                                     timeout=urllib3.Timeout(connect=10.0, read=timeout), preload_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise DestinationError(f"Elasticsearch at {self.where} cannot be reached ({type(exc).__name__}: "
                                   f"{_first_line(exc)}); retrying", transient=True, stream=stream) from None
        raw = resp.data
        try:
            parsed = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            parsed = {"error": {"type": f"HTTP {resp.status}", "reason": raw[:200].decode("utf-8", "replace")}}
        return resp.status, parsed

    def close(self) -> None:
        self.pool.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def reason(body: Any) -> str:
    """Elasticsearch's own words for a failure: ``type: reason`` (and the cause's)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        text = f"{err.get('type')}: {err.get('reason')}"
        cause = err.get("caused_by")
        if isinstance(cause, dict) and cause.get("reason"):
            text += f" ({cause.get('type')}: {cause.get('reason')})"
        return text
    return str(err if err is not None else body)[:300]


def _error_type(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("type")) if isinstance(err, dict) else ""


def failed(status: int, body: Any, what: str, *, stream: str | None = None, line: int | None = None,
           where: str = "") -> DestinationError:
    """The error for a refused request."""
    if status in (401, 403):
        return DestinationError(f"Elasticsearch{' at ' + where if where else ''} refused the credentials "
                                f"(HTTP {status}) to {what}: {reason(body)}; check elasticsearch_username and "
                                f"elasticsearch_password, or elasticsearch_api_key, and the user's privileges",
                                transient=False, stream=stream, line=line)
    transient = status in TRANSIENT_STATUS or status >= 500 and _error_type(body) in (
        "es_rejected_execution_exception", "circuit_breaking_exception", "cluster_block_exception")
    return DestinationError(f"Elasticsearch refused to {what} (HTTP {status}): {reason(body)}", transient=transient,
                            stream=stream, line=line)


# -- values and ids -------------------------------------------------------------------------------------------------
def _datetime(value: Any) -> Any:
    """A date-time as ISO 8601 text Elasticsearch's ``strict_date_optional_time`` reads; a value Python cannot
    read goes as it is (the server refuses it, naming the document's input line)."""
    if type(value) is str:
        if _ISO.match(value):
            return value
        try:
            parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in "Zz" else value)
        except ValueError:
            return value
        return parsed.isoformat()
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    return value


def _key_text(value: Any) -> str:
    if type(value) is str:
        return value
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is float:
        return repr(value)
    if type(value) is int:
        return str(value)
    return _dumps(value, sort=True).decode()


def document_id(values: tuple) -> str:
    """The id of a document from its key values: one key its text, several their JSON array text; longer than
    Elasticsearch's 512 bytes: ``sha256:`` and the hash of that text."""
    text = _key_text(values[0]) if len(values) == 1 else _dumps(list(values), sort=True).decode()
    if len(text.encode()) > MAX_ID_BYTES:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


def _dumps(value: Any, sort: bool = False) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort else 0)
    except (orjson.JSONEncodeError, TypeError):  # an integer beyond 64 bits
        import json

        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort,
                          default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v)).encode()


def field_name(column: str) -> str:
    """The document field of a column: its name, or its name and "_" for a name Elasticsearch reserves."""
    return column + "_" if column in RESERVED_FIELDS else column


def column_name(field: str) -> str:
    return field[:-1] if field.endswith("_") and field[:-1] in RESERVED_FIELDS else field


def mapping_of(columns: Iterable[Column]) -> dict:
    """The mapping of an index holding ``columns``; ``_meta`` keeps each column's logical type by column name."""
    cols = list(columns)
    return {"dynamic": "strict", "_meta": {META_KEY: {"columns": {c.name: c.type for c in cols}}},
            "properties": {field_name(c.name): MAPPING[c.type] for c in cols}}


# -- opening ----------------------------------------------------------------------------------------------------------
def index_prefix(run: RunSettings) -> str:
    prefix = run.option("elasticsearch_index_prefix")
    if prefix is None:
        schema = run.default_target_schema
        prefix = f"{normalise(schema, MAX_PREFIX_BYTES - 1)}." if schema else DEFAULT_PREFIX
    if not _PREFIX_OK.match(prefix) or len(prefix.encode()) > MAX_PREFIX_BYTES:
        raise ConfigError(f"elasticsearch_index_prefix {prefix!r} cannot start an index name: it must be lower "
                          f"case, start with a letter or digit, hold only a-z, 0-9, '_', '-' and '.', and be at "
                          f"most {MAX_PREFIX_BYTES} bytes")
    return prefix


def open_destination(run: RunSettings, connection: ConnectionSettings, *,
                     embedded: bool) -> "ElasticsearchDestination":
    url = connection.option("elasticsearch_url")
    if not url:
        raise ConfigError("the elasticsearch destination needs elasticsearch_url (https://host:9200), in the "
                          "worker's config file or SINGER_INGEST_ELASTICSEARCH_URL")
    if connection.option("elasticsearch_api_key") and connection.option("elasticsearch_username"):
        raise ConfigError("set either elasticsearch_api_key or elasticsearch_username/elasticsearch_password for "
                          "the elasticsearch destination, not both")
    http = Http(url, username=connection.option("elasticsearch_username"),
                password=connection.option("elasticsearch_password"),
                api_key=connection.option("elasticsearch_api_key"),
                ca_file=connection.option("elasticsearch_ca_file"),
                verify_certs=bool(connection.option("elasticsearch_verify_certs")),
                pool_size=run.max_parallelism + 1)
    return ElasticsearchDestination(http, index_prefix(run), bulk_bytes=int(run.option("elasticsearch_bulk_bytes")),
                                    data_stream=bool(run.option("elasticsearch_data_stream")))


class ElasticsearchDestination(base.Destination):
    max_identifier_bytes = MAX_IDENTIFIER_BYTES

    def __init__(self, http: Http, prefix: str, *, bulk_bytes: int = 5_000_000, data_stream: bool = False,
                 retry_deadline_seconds: float = 300.0, sleep: Callable[[float], None] = time.sleep):
        self.http = http
        self.prefix = prefix
        self.bulk_bytes = max(1, bulk_bytes)
        self.data_stream = data_stream
        self.retry_deadline_seconds = retry_deadline_seconds
        self._sleep = sleep
        self._offsets_ready = False
        self._dead_letters_ready = False
        self._lock = threading.Lock()
        self.offsets_index = self.index(OFFSETS_TABLE)

    def index(self, table: str) -> str:
        return self.prefix + table

    # -- requests ----------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None, *, what: str, stream: str | None = None,
              ok: Iterable[int] = (200, 201), timeout: float = REQUEST_SECONDS) -> tuple[int, Any]:
        """One request, retried while it fails transiently; a status neither in ``ok`` nor 404 is an error."""
        allowed = set(ok)

        def attempt():
            status, answer = self.http.request(method, path, body, timeout=timeout, stream=stream)
            if status in allowed or status == 404:
                return status, answer
            raise failed(status, answer, what, stream=stream, where=self.http.where)

        return with_retries(attempt, what=f"elasticsearch: {what}", deadline_seconds=self.retry_deadline_seconds)

    def _refresh(self, name: str, stream: str | None) -> None:
        self._call("POST", f"/{url_quote(name, safe='')}/_refresh", what=f"refresh index {name}", stream=stream)

    # -- offsets -----------------------------------------------------------------------------------
    def _ensure_offsets(self) -> None:
        if self._offsets_ready:
            return
        mapping = {"dynamic": "strict", "properties": {
            "run_id": {"type": "keyword"}, "stream": {"type": "keyword"}, "seq": {"type": "long"},
            "fence": {"type": "long"}, "updated_at": {"type": "date"}}}
        self._create_index(self.offsets_index, mapping, None, None)
        self._offsets_ready = True

    @staticmethod
    def _offset_id(run_id: str, stream: str) -> str:
        return document_id((f"{run_id}/{stream}",))

    def _read_offset(self, run_id: str, stream: str) -> tuple[int, int, tuple[int, int] | None]:
        """(offset, fence, (seq_no, primary_term) of the offset document or None when there is none)."""
        self._ensure_offsets()
        doc = url_quote(self._offset_id(run_id, stream), safe="")
        status, answer = self._call("GET", f"/{url_quote(self.offsets_index, safe='')}/_doc/{doc}",
                                    what="read the stream's offset", stream=stream)
        if status == 404 or not answer.get("found"):
            return 0, 0, None
        src = answer.get("_source") or {}
        return int(src.get("seq") or 0), int(src.get("fence") or 0), (answer["_seq_no"], answer["_primary_term"])

    @staticmethod
    def _check_fence(stream: str, stored: int, fence: int) -> None:
        if stored > fence:
            raise Fenced(f"stream {stream!r}: another worker took this stream over (fence {stored} > {fence})")

    def _advance(self, run_id: str, stream: str, seq: int, fence: int) -> int:
        """Set the stream's offset to max(stored, seq) and its fence to ``fence`` by compare-and-set; returns the
        offset stored before. ``Fenced`` when the stored fence is higher."""
        for _ in range(20):
            stored_seq, stored_fence, version = self._read_offset(run_id, stream)
            self._check_fence(stream, stored_fence, fence)
            doc = {"run_id": run_id, "stream": stream, "seq": max(stored_seq, seq), "fence": fence,
                   "updated_at": datetime.now(timezone.utc).isoformat()}
            index, doc_id = url_quote(self.offsets_index, safe=""), url_quote(self._offset_id(run_id, stream), safe="")
            if version is None:
                path = f"/{index}/_create/{doc_id}"
            else:
                path = f"/{index}/_doc/{doc_id}?if_seq_no={version[0]}&if_primary_term={version[1]}"
            status, _ = self._call("PUT", path, doc, what="write the stream's offset", stream=stream,
                                   ok=(200, 201, 409))
            if status in (200, 201):
                return stored_seq
            # 409: changed since it was read (a new owner's claim): read again, and refuse if fenced
        raise DestinationError("the stream's offset document keeps changing under this worker", transient=True,
                               stream=stream)

    # -- indices -----------------------------------------------------------------------------------
    def _create_index(self, name: str, mapping: dict, alias: str | None, stream: str | None) -> bool:
        """Create an index (with an alias); False when it exists already."""
        body: dict[str, Any] = {"mappings": mapping}
        if alias:
            body["aliases"] = {alias: {}}
        status, answer = self._call("PUT", f"/{url_quote(name, safe='')}", body, what=f"create index {name}",
                                    stream=stream, ok=(200, 201, 400))
        if status == 400:
            if _error_type(answer) in ("resource_already_exists_exception", "index_already_exists_exception"):
                return False
            raise failed(status, answer, f"create index {name}", stream=stream)
        return True

    def _mapping(self, name: str, stream: str | None) -> tuple[str, dict] | None:
        """(concrete index, its mapping) behind ``name`` (None: no such index or alias)."""
        status, answer = self._call("GET", f"/{url_quote(name, safe='')}/_mapping", what=f"read the mapping of {name}",
                                    stream=stream)
        if status == 404 or not answer:
            return None
        if len(answer) > 1 and not (self.data_stream and name.startswith(self.prefix)
                                    and not name.endswith(base.DEAD_LETTER_TABLE)):
            raise DestinationError(f"{name} is an alias of {len(answer)} indices ({', '.join(sorted(answer))}); "
                                   f"the elasticsearch destination writes through an alias of one index",
                                   transient=False, stream=stream)
        concrete = sorted(answer)[-1]
        return concrete, (answer[concrete] or {}).get("mappings") or {}

    @staticmethod
    def _existing(spec: TableSpec, mapping: dict) -> TableSpec:
        logical = ((mapping.get("_meta") or {}).get(META_KEY) or {}).get("columns") or {}
        props = {column_name(f): p for f, p in (mapping.get("properties") or {}).items()}
        cols = []
        for name in list(logical) + [n for n in props if n not in logical]:
            if name == "@timestamp":
                continue
            kind = logical.get(name) or LOGICAL.get((props.get(name) or {}).get("type", "object"), base.JSON)
            cols.append(Column(name, None, kind))
        return TableSpec(spec.stream, spec.table, spec.schema_name, tuple(cols), spec.key_columns, spec.metadata)

    def ensure_table(self, spec: TableSpec) -> TableSpec:
        name = self.index(spec.table)
        if self.data_stream and spec.table != base.DEAD_LETTER_TABLE:
            return self._ensure_data_stream(spec, name)
        return self._ensure_index(spec, name)

    def _ensure_index(self, spec: TableSpec, name: str) -> TableSpec:
        for _ in range(5):
            found = self._mapping(name, spec.stream)
            if found is None:
                if self._create_index(f"{name}-{1:06d}", mapping_of(spec.columns), name, spec.stream):
                    logger.info("stream %r: created index %s-000001 behind the alias %s", spec.stream, name, name)
                    return spec
                continue  # made by another worker meanwhile: read it
            concrete, mapping = found
            existing = self._existing(spec, mapping)
            merged, add, change = base.merge_specs(existing, spec)
            if change:
                self._new_generation(spec, name, concrete, merged, copy=True)
                for c in change:
                    logger.info("stream %r: widened field %s to %s (index %s reindexed)", spec.stream, c.name, c.type,
                                name)
            elif add or not (mapping.get("_meta") or {}).get(META_KEY):
                self._put_mapping(name, merged, spec.stream)
                for c in add:
                    logger.info("stream %r: added field %s %s to %s", spec.stream, c.name, c.type, name)
            return merged
        raise DestinationError(f"index {name} keeps appearing and disappearing while it is set up", transient=True,
                               stream=spec.stream)

    def _put_mapping(self, name: str, spec: TableSpec, stream: str) -> None:
        m = mapping_of(spec.columns)
        self._call("PUT", f"/{url_quote(name, safe='')}/_mapping", {"_meta": m["_meta"], "properties": m["properties"]},
                   what=f"add fields to the mapping of {name}", stream=stream)

    def _new_generation(self, spec: TableSpec, name: str, concrete: str, merged: TableSpec, *, copy: bool) -> None:
        """The next generation of an aliased index, with ``merged``'s mapping; the documents copied (``copy``) or
        not (an overwrite); the alias moved to it in one call; the old index deleted."""
        m = GENERATION.search(concrete)
        if concrete == name or not m:
            raise DestinationError(
                f"index {name} is a plain index (made elsewhere), not an alias; Elasticsearch cannot change the "
                f"type of a field in place ({'overwrite' if not copy else 'a widened type'} needs a new index): "
                f"reindex it into {name}-000001 with an alias {name}, or load into another prefix",
                transient=False, stream=spec.stream)
        new = f"{name}-{int(m.group(1)) + 1:06d}"
        if not self._create_index(new, mapping_of(merged.columns), None, spec.stream):
            # left by an attempt that stopped half way (the alias still points at the old index): start it again
            self._call("DELETE", f"/{url_quote(new, safe='')}", what=f"delete the unfinished index {new}",
                       stream=spec.stream)
            self._create_index(new, mapping_of(merged.columns), None, spec.stream)
        if copy:
            self._refresh(concrete, spec.stream)
            _, answer = self._call("POST", "/_reindex?refresh=true&wait_for_completion=true",
                                   {"source": {"index": concrete},
                                    "dest": {"index": new, "version_type": "external"}},
                                   what=f"copy {concrete} into {new}", stream=spec.stream, timeout=REINDEX_SECONDS)
            if answer.get("failures"):
                raise DestinationError(f"copying {concrete} into {new} failed: {str(answer['failures'][0])[:300]}",
                                       transient=False, stream=spec.stream)
        self._call("POST", "/_aliases", {"actions": [{"remove": {"index": concrete, "alias": name}},
                                                      {"add": {"index": new, "alias": name}}]},
                   what=f"move the alias {name} to {new}", stream=spec.stream)
        self._call("DELETE", f"/{url_quote(concrete, safe='')}", what=f"delete the old index {concrete}",
                   stream=spec.stream)

    def _ensure_data_stream(self, spec: TableSpec, name: str) -> TableSpec:
        found = self._mapping(name, spec.stream)
        existing = self._existing(spec, found[1]) if found else None
        merged, add, change = base.merge_specs(existing, spec)
        if change:
            raise DestinationError(f"data stream {name}: field {change[0].name} would change its type to "
                                   f"{change[0].type}, which a data stream's backing indices cannot do; load into "
                                   f"another prefix or reindex the data stream", transient=False, stream=spec.stream)
        mapping = mapping_of(merged.columns)
        mapping["properties"]["@timestamp"] = {"type": "date"}
        self._call("PUT", f"/_index_template/{url_quote(name, safe='')}",
                   {"index_patterns": [name], "data_stream": {}, "priority": 200, "template": {"mappings": mapping}},
                   what=f"put the index template of data stream {name}", stream=spec.stream)
        if found is None:
            status, answer = self._call("PUT", f"/_data_stream/{url_quote(name, safe='')}",
                                        what=f"create data stream {name}", stream=spec.stream, ok=(200, 201, 400))
            if status == 400 and "already_exists" not in _error_type(answer):
                raise failed(status, answer, f"create data stream {name}", stream=spec.stream)
        elif add:
            self._call("PUT", f"/{url_quote(name, safe='')}/_mapping",
                       {"_meta": mapping["_meta"], "properties": mapping["properties"]},
                       what=f"add fields to data stream {name}", stream=spec.stream)
        return merged

    # -- writing -----------------------------------------------------------------------------------
    def claim_stream(self, run_id: str, stream: str, fence: int) -> int:
        return self._advance(run_id, stream, 0, fence)

    def write_batch(self, spec: TableSpec, batch: Batch) -> None:
        stored_seq, stored_fence, _ = self._read_offset(batch.run_id, spec.stream)
        self._check_fence(spec.stream, stored_fence, batch.fence)
        if base.committed_before(stored_seq, spec.stream, batch.upto_seq, batch.has_writes):
            return
        name = self.index(spec.table)
        if batch.truncate_first:
            self._truncate(spec, name)
        if batch.dead_letters:
            self._write_dead_letters(spec, batch)
        if batch.rows:
            keyed = batch.upsert and bool(spec.key_columns) and not self.data_stream
            if keyed:
                base.require_keys(spec, batch)
            self._bulk(spec.stream, name, self._actions(spec, batch, name, keyed), batch.lines)
        self._advance(batch.run_id, spec.stream, batch.upto_seq, batch.fence)

    def _truncate(self, spec: TableSpec, name: str) -> None:
        found = self._mapping(name, spec.stream)
        if found is None:
            return
        concrete, mapping = found
        if not self.data_stream and concrete != name and GENERATION.search(concrete):
            self._new_generation(spec, name, concrete, self._existing(spec, mapping), copy=False)
            logger.info("stream %r: overwrite: %s starts empty (index %s deleted)", spec.stream, name, concrete)
            return
        self._refresh(name, spec.stream)
        self._call("POST", f"/{url_quote(name, safe='')}/_delete_by_query?conflicts=proceed&refresh=true",
                   {"query": {"match_all": {}}}, what=f"empty {name} (overwrite)", stream=spec.stream,
                   timeout=REINDEX_SECONDS)

    def _sequences(self, spec: TableSpec, batch: Batch) -> list[int]:
        if batch.lines and len(batch.lines) == len(batch.rows):
            return batch.sequences
        if spec.metadata:
            at = spec.index(base.SEQUENCE_COLUMN)
            return [row[at] for row in batch.rows]
        raise DestinationError("a batch without the input line of each row cannot be given document ids",
                               transient=False, stream=spec.stream)

    def _actions(self, spec: TableSpec, batch: Batch, name: str, keyed: bool) -> Iterable[bytes]:
        """One NDJSON action and document (two lines) per row, in row order."""
        names = [field_name(c.name) for c in spec.columns]
        dates = [i for i, c in enumerate(spec.columns) if c.type in (base.TIMESTAMP, base.DATE)]
        key_at = [spec.index(k) for k in spec.key_columns] if keyed else []
        sequences = self._sequences(spec, batch)
        index_json = orjson.dumps(name).decode()
        if self.data_stream:
            stamp_at = next((spec.index(c) for c in ("_sdc_extracted_at", "_sdc_received_at")
                             if spec.metadata and c in names), None)
            now = datetime.now(timezone.utc).isoformat()
        cache: dict[Any, Any] = {}
        for row, seq in zip(batch.rows, sequences):
            if dates:
                row = list(row)
                for i in dates:
                    v = row[i]
                    if v is not None:
                        out = cache.get(v)
                        if out is None:
                            out = cache[v] = _datetime(v)
                        row[i] = out
            doc = {n: v for n, v in zip(names, row) if v is not None}
            if self.data_stream:
                doc["@timestamp"] = (row[stamp_at] if stamp_at is not None else None) or now
                action = f'{{"create":{{"_index":{index_json},"_id":"{seq}"}}}}\n'
            else:
                doc_id = orjson.dumps(document_id(tuple(row[i] for i in key_at))).decode() if keyed else f'"{seq}"'
                action = (f'{{"index":{{"_index":{index_json},"_id":{doc_id},"version":{seq},'
                          f'"version_type":"external_gte"}}}}\n')
            yield action.encode() + _dumps(doc) + b"\n"

    def _bulk(self, stream: str, name: str, actions: Iterable[bytes], lines: list[int]) -> None:
        """Send the actions in ``_bulk`` requests of about ``bulk_bytes``, each item's result checked."""
        chunk: list[tuple[int, bytes]] = []
        size = 0
        for n, action in enumerate(actions):
            chunk.append((n, action))
            size += len(action)
            if size >= self.bulk_bytes:
                self._send(stream, name, chunk, lines)
                chunk, size = [], 0
        if chunk:
            self._send(stream, name, chunk, lines)

    def _send(self, stream: str, name: str, chunk: list[tuple[int, bytes]], lines: list[int]) -> None:
        """One ``_bulk`` request; items the server could not take for now (429, 5xx) are sent again with backoff;
        an item it refused fails the batch naming its input line; 409 (a newer version is stored, or a data
        stream's document exists) counts as written."""
        start = time.monotonic()
        delay = 0.05
        attempt = 0
        def line_of(n: int) -> int | None:
            return lines[n] if n < len(lines) else None

        while True:
            attempt += 1
            retry: list[tuple[int, bytes]] = []
            problem: DestinationError | None = None
            try:
                status, answer = self.http.request("POST", "/_bulk?filter_path=errors,items.*.status,items.*.error",
                                                   ndjson=b"".join(a for _, a in chunk), stream=stream)
            except DestinationError as exc:  # the connection failed: the whole request again
                if not exc.transient:
                    raise
                status, answer, problem = 0, {}, exc
            if status == 0:
                retry = chunk
            elif status == 413:
                raise DestinationError(f"a _bulk request of {len(chunk)} documents is larger than the server takes "
                                       f"(http.max_content_length); lower elasticsearch_bulk_bytes, or the document "
                                       f"is too large", transient=False, stream=stream, line=line_of(chunk[0][0]))
            elif status != 200:
                problem = failed(status, answer, f"take a _bulk request into {name}", stream=stream,
                                 where=self.http.where)
                if not problem.transient:
                    raise problem
                retry = chunk
            elif answer.get("errors"):
                items = answer.get("items") or []
                if len(items) != len(chunk):
                    problem = DestinationError(f"_bulk answered {len(items)} items for {len(chunk)} documents",
                                               transient=True, stream=stream)
                    items, retry = [], chunk
                for (n, action), item in zip(chunk, items):
                    result = next(iter(item.values()))
                    code = result.get("status", 0)
                    if code < 300 or code == 409 or code == 404 and action.startswith(b'{"update"'):
                        continue  # written; or a newer version is there; or a soft-deleted document is gone
                    error = failed(code, result, f"write the document into {name}", stream=stream,
                                   line=line_of(n))
                    if not error.transient:
                        raise error
                    retry.append((n, action))
                    problem = problem or error
            if not retry:
                return
            waited = time.monotonic() - start
            if waited + delay > self.retry_deadline_seconds:
                raise DestinationError(f"{problem.what if problem else 'a _bulk request failed'} (still failing "
                                       f"after {attempt} attempts in {waited:.0f} s)", transient=False,
                                       stream=stream, line=line_of(retry[0][0]))
            logger.warning("stream %r: %d of %d documents not taken for now, sent again in %.2f s (attempt %d): %s",
                           stream, len(retry), len(chunk), delay, attempt, problem.what if problem else "")
            self._sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)
            chunk = retry

    def _write_dead_letters(self, spec: TableSpec, batch: Batch) -> None:
        dl = base.dead_letter_spec(spec.schema_name)
        with self._lock:
            ready = self._dead_letters_ready
        if not ready:
            self._ensure_index(dl, self.index(dl.table))
            with self._lock:
                self._dead_letters_ready = True
        name = self.index(dl.table)
        index_json = orjson.dumps(name).decode()
        names = dl.column_names
        stream_at, seq_at, line_at = dl.index("stream"), dl.index("_sdc_sequence"), dl.index("line")
        at_at = dl.index("failed_at")

        def actions() -> Iterable[bytes]:
            for row in batch.dead_letters:
                seq = int(row[seq_at])
                doc_id = orjson.dumps(document_id((f"{row[stream_at]}/{seq}",))).decode()
                values = list(row)
                values[at_at] = _datetime(values[at_at])
                doc = {n: v for n, v in zip(names, values) if v is not None}
                yield (f'{{"index":{{"_index":{index_json},"_id":{doc_id},"version":{seq},'
                       f'"version_type":"external_gte"}}}}\n').encode() + _dumps(doc) + b"\n"

        self._bulk(spec.stream, name, actions(), [row[line_at] for row in batch.dead_letters])

    # -- ACTIVATE_VERSION ------------------------------------------------------------------------
    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None:
        _, stored_fence, _ = self._read_offset(run_id, spec.stream)
        self._check_fence(spec.stream, stored_fence, fence)
        if not spec.metadata:
            logger.warning("stream %r: ACTIVATE_VERSION ignored: add_record_metadata is off, so documents carry "
                           "no _sdc_table_version", spec.stream)
        else:
            name = self.index(spec.table)
            path = url_quote(name, safe="")
            older = {"bool": {"should": [{"range": {base.VERSION_COLUMN: {"lt": int(version)}}},
                                         {"bool": {"must_not": [{"exists": {"field": base.VERSION_COLUMN}}]}}],
                              "minimum_should_match": 1}}
            self._refresh(name, spec.stream)
            if hard_delete:
                self._call("POST", f"/{path}/_delete_by_query?conflicts=proceed&refresh=true", {"query": older},
                           what=f"delete older versions from {name}", stream=spec.stream, timeout=REINDEX_SECONDS)
            else:
                self._soft_delete(spec, name, older, _datetime(deleted_at))
        self._advance(run_id, spec.stream, upto_seq, fence)

    def _soft_delete(self, spec: TableSpec, name: str, older: dict, at: str) -> None:
        """Set ``_sdc_deleted_at`` on the documents of older versions that lack it, a page at a time: a search,
        then ``update`` actions (compare-and-set: a document rewritten meanwhile is left to the next round)."""
        query = {"bool": {"filter": [older], "must_not": [{"exists": {"field": base.DELETED_COLUMN}}]}}
        path = url_quote(name, safe="")
        partial = _dumps({"doc": {base.DELETED_COLUMN: at}})
        for _ in range(100_000):
            _, answer = self._call("POST", f"/{path}/_search",
                                   {"query": query, "size": SEARCH_PAGE, "_source": False,
                                    "seq_no_primary_term": True},
                                   what=f"find older versions in {name}", stream=spec.stream)
            hits = (answer.get("hits") or {}).get("hits") or []
            if not hits:
                return
            actions = [orjson.dumps({"update": {"_index": h["_index"], "_id": h["_id"], "if_seq_no": h["_seq_no"],
                                                "if_primary_term": h["_primary_term"]}}) + b"\n" + partial + b"\n"
                       for h in hits]
            self._bulk(spec.stream, name, actions, [])
            self._refresh(name, spec.stream)
        raise DestinationError(f"soft delete in {name} does not finish", transient=False, stream=spec.stream)

    def close(self) -> None:
        self.http.close()
