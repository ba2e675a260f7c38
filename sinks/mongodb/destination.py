"""MongoDB destination (pymongo 4).

Where documents go: the database named by ``default_target_schema``; when that is unset, the database in the path
of ``mongodb_url`` (``mongodb://user:password@host:27017/mydb``); when the URL names none either,
``singer_ingest``. One collection per stream, named by the naming rule of ``sinks/names.py`` (120 bytes at most).
Three collections of this target's own sit beside them: ``_singer_ingest_offsets`` (one document per (run,
stream): its committed offset and fencing token), ``_singer_ingest_collections`` (each collection's columns and
their logical types, which schema evolution merges into: MongoDB keeps no schema of its own) and, once a record
is set aside, ``_singer_ingest_dead_letter``.

A document is a record's row: one field per column (nulls kept, so every document has the stream's columns), and
an ``_id``:

- a keyed stream under the upsert load method: the key's value, or a sub-document ``{key1: v1, key2: v2}`` in
  ``key_properties`` order for a compound key (the key fields stay in the document as well);
- any other stream (no key, ``append-only``, ``overwrite``): the record's ``_sdc_sequence`` (the run's sequence
  base plus its input line), an integer that is the same each time the same input line is loaded, and unique
  across runs of the same tap.

How the rules are kept (class (c), idempotent; ``sinks/base.py``). MongoDB has transactions, but only on a
replica set and with limits (a transaction's writes must fit in its oplog entries, 60 seconds by default) that a
batch of 10,000 records does not fit in reliably, so a batch is not one transaction. Instead:

- Nothing doubled: every write is on a derived ``_id``, so writing a batch twice leaves the same documents (a
  replay after a crash, or a batch whose offset write was lost). Keyed documents are a
  ``ReplaceOne(..., upsert=True)``; keyless ones (ids from the sequence) an ``InsertOne``, and an insert that finds
  its ``_id`` taken (duplicate key error 11000) found the same document, written by an earlier attempt from the
  same input line, and is skipped: cheaper than an upsert on every server, and just as exact. A keyed
  batch holding one key twice keeps its last record by sequence before writing (``base.last_by_sequence``):
  ``bulk_write(ordered=False)`` may apply a chunk's operations in any order.
- An older record never replaces a newer one: with record metadata on, a keyed replace is filtered on
  ``_sdc_sequence <= the record's sequence``. When the stored document is newer the filter matches nothing and
  the upsert's insert collides with the stored ``_id`` (duplicate key error 11000), which is the expected
  answer and skipped; a stored document without ``_sdc_sequence`` (written with metadata off) is replaced.
  So a late write of a stale owner cannot bring back an older record.
- Nothing lost: the documents are written first, then the stream's offset (``$max``), filtered on the fencing
  token; an entry is acknowledged only after both returned.
- Fenced: ``claim_stream`` raises the token with a filtered update (``fence <= new``) and refuses a lower one;
  ``write_batch`` and ``activate_version`` check the token before writing and write the offset only if the
  stored token is not higher (``Fenced`` otherwise).
- What it cannot give: a reader may see a batch half written (no transaction); ``base.committed_before`` skips a
  batch only when its offset write went through (otherwise the batch is written again, to the same ids).
- Dead letters (``base.dead_letter_spec``): documents with ``_id`` "<stream>/<_sdc_sequence>" (a string, so
  that every server matches it by the ``_id`` index alone), written with the batch's documents, before the
  offset: a replay rewrites them, never adds them twice.

Load path: ``bulk_write`` with ``ordered=False``, in chunks of at most 5,000 documents or 8 MB of BSON. Each
document is encoded to BSON here (``bson.encode``), once: its size is checked against MongoDB's 16 MB limit
(a larger document fails the batch naming its input line, which MongoDB itself would refuse with no line), and
the encoded bytes go to the driver as they are (``RawBSONDocument``). A write error of any other kind fails the
batch naming the input line of the document it concerns.

Types: integer int64, number double (Decimal128 where the schema gives a decimal scale, ``multipleOf`` 0.01,
0.001, ..., as decimal columns of a source come: written from the value's shortest decimal text, so 19.99 is
stored as 19.99; ``mongodb_decimal128: false`` keeps doubles, for servers without Decimal128), string string, boolean bool, date-time a BSON date (UTC; BSON dates hold
milliseconds, so microseconds are cut), date and time their ISO text (BSON has no date-only or time type), JSON
values as BSON sub-documents and arrays. A property named ``_id`` (as taps reading MongoDB have) is the document id:
it loads as the stream's one key (upsert), and fails the batch otherwise. Field names: a top-level name is the normalised column name (``a-z``,
``0-9``, ``_``: no ``.`` or ``$``). Inside JSON values, one rule: in every object key, ``.`` becomes ``．``
(U+FF0E, fullwidth full stop) and a leading ``$`` becomes ``＄`` (U+FF04), so that every key can be stored on
every MongoDB version and addressed with dotted paths in queries and updates, and the original key can be told
back; a key holding NUL, which BSON cannot store, fails the batch naming its input line. An integer beyond 64
bits, which BSON cannot hold, fails the batch naming its input line.

Schema evolution: new columns are recorded in ``_singer_ingest_collections`` (documents written before lack them,
which queries read as null); a widened type (integer to number, anything to string or JSON) is recorded there
and stored documents keep the values they have: a document store holds each value with its own type, so
nothing is rewritten.

ACTIVATE_VERSION: hard, ``delete_many`` of the documents of older versions (or none); soft, ``update_many``
setting ``_sdc_deleted_at`` on those not deleted yet; then the offset, as for a batch.

Errors: connection failures, timeouts, elections (not primary, shutting down), write conflicts, write concern
errors and throttling (Cosmos DB's 16500) are transient and retried with backoff; the rest fail the run with a
message naming the stream and, where a document is concerned, its input line. The URL (and its password) is never
logged and never part of an error message.
"""

from __future__ import annotations

import decimal
import logging
from datetime import date, datetime, time, timezone
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import bson
import pymongo
import pymongo.errors
from bson.decimal128 import Decimal128
from bson.raw_bson import RawBSONDocument
from pymongo import InsertOne, ReplaceOne, ReturnDocument

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, DestinationError, Fenced

from .. import base
from ..base import Batch, Column, TableSpec
from ..retry import with_retries

logger = logging.getLogger(__name__)

OFFSETS = "_singer_ingest_offsets"
CATALOG = "_singer_ingest_collections"
RESERVED = (OFFSETS, CATALOG, base.DEAD_LETTER_TABLE)
DEFAULT_DATABASE = "singer_ingest"
MAX_IDENTIFIER_BYTES = 120        # a namespace (database.collection) holds 255 bytes; a database name 63
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
CHUNK_DOCUMENTS = 5000
CHUNK_BYTES = 8 * 1024 * 1024
DUPLICATE_KEY = 11000
ID_KEY = {"_id": 1}
BAD_DATABASE_CHARS = set('/\\. "$*<>:|?\x00')

# Server error codes after which the same write may succeed a little later or on another primary.
TRANSIENT_CODES = {
    6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,  # network, shutdown, election, not primary
    50, 112, 64, 16500, 24, 46, 133, 317,  # time limit, write conflict, write concern, throttled, lock timeouts
}
AUTH_CODES = {13, 18}  # unauthorized, authentication failed

DOT, DOLLAR = "\uff0e", "\uff04"


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> "MongoDestination":
    url = connection.option("mongodb_url")
    if not url:
        raise ConfigError("the mongodb destination needs mongodb_url (mongodb://user:password@host:27017/) in the "
                          "worker's config or its environment (SINGER_INGEST_MONGODB_URL)")
    return MongoDestination(url, run.default_target_schema, decimal128=bool(run.option("mongodb_decimal128")))


def _password(url: str) -> str | None:
    """The URL's password as written and decoded (read without the driver, which would resolve mongodb+srv)."""
    try:
        raw = urlsplit(url).password
    except ValueError:
        return None
    return raw or None


def _redact(text: str, url: str) -> str:
    """``text`` without the URL and its password, for messages that might quote them."""
    out = text.replace(url, "<mongodb_url>")
    password = _password(url)
    for secret in {password, unquote(password)} if password else ():
        out = out.replace(secret, "***")
    return out


def _url_database(url: str) -> str | None:
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    return unquote(path.lstrip("/")) or None


def database_name(name: str) -> str:
    if not name or len(name.encode()) > 63 or set(name) & BAD_DATABASE_CHARS:
        raise ConfigError(f"MongoDB database name {name!r} (default_target_schema or mongodb_url's path) must be 1 "
                          f"to 63 bytes without any of / \\ . space \" $ * < > : | ?")
    return name


# -- values -----------------------------------------------------------------------------------------------------
class _Refused(Exception):
    """A value BSON cannot hold; the caller names the input line."""


def _datetime(value: Any) -> Any:
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in "Zz" else value)
        except ValueError:
            raise _Refused(f"date-time value {value!r} cannot be read as ISO 8601") from None
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    return value


def _text(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (date, time)) else value


def _key(key: str) -> str:
    if "\x00" in key:
        raise _Refused(f"an object key holds a NUL character, which MongoDB cannot store: {key!r}")
    if "." in key:
        key = key.replace(".", DOT)
    if key.startswith("$"):
        key = DOLLAR + key[1:]
    return key


def _json(value: Any) -> Any:
    """A JSON value with its object keys made storable (module docstring); the same object when none changes."""
    if isinstance(value, dict):
        out = None
        for k, v in value.items():
            nv = _json(v) if isinstance(v, (dict, list)) else v
            nk = k if ("." not in k and not k.startswith("$") and "\x00" not in k) else _key(k)
            if out is None and (nk is not k or nv is not v):
                out = {}
                for k2, v2 in value.items():
                    if k2 == k:
                        break
                    out[k2] = v2
            if out is not None:
                out[nk] = nv
        return value if out is None else out
    if isinstance(value, list):
        new = [_json(v) if isinstance(v, (dict, list)) else v for v in value]
        return value if all(a is b for a, b in zip(new, value)) else new
    return value


def _memo(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert`` with a cache for the batch: metadata date-times repeat from row to row."""
    cache: dict[Any, Any] = {}

    def memo(value: Any) -> Any:
        out = cache.get(value)
        if out is None:
            out = convert(value)
            if len(cache) < 100_000:
                cache[value] = out
        return out
    return memo


def _decimal(value: Any) -> Any:
    """A number as Decimal128 from its shortest decimal text (repr of a float: 19.99, not the binary double's
    19.989999999999998...)."""
    if type(value) is bool or not isinstance(value, (int, float)):
        return value
    try:
        return Decimal128(repr(value) if isinstance(value, float) else str(value))
    except (decimal.Inexact, decimal.InvalidOperation, ValueError):
        raise _Refused(f"number {value!r} has more than 34 digits, which Decimal128 cannot hold") from None


def converters(columns: tuple[Column, ...], decimal128: bool = False) -> list[tuple[int, Callable[[Any], Any]]]:
    """(column index, converter) of the columns whose values change on the way to BSON."""
    out: list[tuple[int, Callable[[Any], Any]]] = []
    for i, c in enumerate(columns):
        if c.type == base.NUMBER and c.scale is not None and decimal128:
            out.append((i, _decimal))
        elif c.type == base.TIMESTAMP:
            out.append((i, _memo(_datetime)))
        elif c.type in (base.DATE, base.TIME):
            out.append((i, _text))
        elif c.type == base.JSON:
            out.append((i, _json))
    return out


def documents(spec: TableSpec, rows: list, ids: list, decimal128: bool = False) -> "Callable[[int], dict]":
    """A function making the document of row ``n`` (converted values, ``_id`` first)."""
    names = spec.column_names
    convs = converters(spec.columns, decimal128)

    def doc(n: int) -> dict:
        row = rows[n]
        if convs:
            row = list(row)
            for i, conv in convs:
                if row[i] is not None:
                    row[i] = conv(row[i])
        d = {"_id": ids[n]}
        d.update(zip(names, row))
        d["_id"] = ids[n]  # a property named _id is the document id only as the stream's key (write_batch)
        return d
    return doc


# -- the destination --------------------------------------------------------------------------------------------
class MongoDestination(base.Destination):
    max_identifier_bytes = MAX_IDENTIFIER_BYTES

    def __init__(self, url: str, database: str | None = None, *, decimal128: bool = True,
                 retry_deadline_seconds: float = 300.0, server_selection_timeout_ms: int = 10_000):
        self._url = url
        self.decimal128 = decimal128
        if not url.startswith(("mongodb://", "mongodb+srv://")):
            raise ConfigError("mongodb_url must start with mongodb:// or mongodb+srv://")
        self.database = database_name(database or _url_database(url) or DEFAULT_DATABASE)
        self.retry_deadline_seconds = retry_deadline_seconds
        try:
            self.client = pymongo.MongoClient(url, serverSelectionTimeoutMS=server_selection_timeout_ms,
                                              appname="singer-ingest")
        except (pymongo.errors.PyMongoError, ValueError) as exc:
            raise ConfigError(f"mongodb_url is not a valid MongoDB URL: {_redact(str(exc), url)}") from None
        self.db = self.client[self.database]
        self._dead_letters_ready = False

    # -- helpers -----------------------------------------------------------------------------------
    def _translate(self, exc: BaseException, stream: str | None, line: int | None = None) -> DestinationError:
        text = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, self._url)
        if isinstance(exc, pymongo.errors.ConnectionFailure):  # AutoReconnect, NetworkTimeout, server selection
            return DestinationError(f"MongoDB unreachable: {text}", transient=True, stream=stream, line=line)
        if isinstance(exc, pymongo.errors.WTimeoutError):
            return DestinationError(f"MongoDB write concern timed out: {text}", transient=True, stream=stream)
        if isinstance(exc, pymongo.errors.OperationFailure):
            code = exc.code
            if code in AUTH_CODES:
                return DestinationError(f"MongoDB refused the user of mongodb_url ({text}); check its user, password "
                                        f"and roles (readWrite on database {self.database})", transient=False,
                                        stream=stream)
            transient = code in TRANSIENT_CODES or exc.has_error_label("RetryableWriteError") or \
                exc.has_error_label("TransientTransactionError")
            return DestinationError(f"MongoDB: {text}", transient=transient, stream=stream, line=line)
        return DestinationError(f"MongoDB: {text}", transient=False, stream=stream, line=line)

    def _run(self, stream: str | None, what: str, fn: Callable[[], Any]) -> Any:
        def attempt():
            try:
                return fn()
            except pymongo.errors.PyMongoError as exc:
                raise self._translate(exc, stream) from exc

        return with_retries(attempt, what=what, deadline_seconds=self.retry_deadline_seconds)

    @staticmethod
    def _offset_id(run_id: str, stream: str) -> str:
        return f"{run_id}/{stream}"  # a run id holds no "/"

    def _stored(self, run_id: str, stream: str) -> tuple[int, int]:
        doc = self.db[OFFSETS].find_one({"_id": self._offset_id(run_id, stream)})
        if doc is None:
            return 0, 0
        return int(doc.get("offset") or 0), int(doc.get("fence") or 0)

    @staticmethod
    def _check_fence(stream: str, stored: int, fence: int) -> None:
        if stored > fence:
            raise Fenced(f"stream {stream!r}: another worker took this stream over (fence {stored} > {fence})")

    def _set_offset(self, run_id: str, stream: str, upto_seq: int, fence: int) -> None:
        """Raise the stored offset to ``upto_seq``, only if the stored fence is not higher than ``fence``."""
        oid = self._offset_id(run_id, stream)
        offsets = self.db[OFFSETS]
        while True:
            res = offsets.update_one({"_id": oid, "fence": {"$lte": fence}},
                                     {"$set": {"fence": fence}, "$max": {"offset": upto_seq}})
            if res.matched_count:
                return
            if offsets.find_one({"_id": oid}) is not None:
                self._check_fence(stream, self._stored(run_id, stream)[1], fence)
                continue  # the stored fence is not higher after all (changed meanwhile): try again
            try:
                offsets.insert_one({"_id": oid, "run_id": run_id, "stream": stream, "fence": fence,
                                   "offset": upto_seq})
                return
            except pymongo.errors.DuplicateKeyError:
                continue

    # -- the interface -----------------------------------------------------------------------------
    def claim_stream(self, run_id: str, stream: str, fence: int) -> int:
        oid = self._offset_id(run_id, stream)

        def fn() -> int:
            offsets = self.db[OFFSETS]
            while True:
                doc = offsets.find_one_and_update({"_id": oid, "fence": {"$lte": fence}}, {"$set": {"fence": fence}},
                                                  return_document=ReturnDocument.AFTER)
                if doc is not None:
                    return int(doc.get("offset") or 0)
                stored = offsets.find_one({"_id": oid})
                if stored is not None:
                    self._check_fence(stream, int(stored.get("fence") or 0), fence)
                    continue
                try:
                    offsets.insert_one({"_id": oid, "run_id": run_id, "stream": stream, "fence": fence,
                                       "offset": 0})
                    return 0
                except pymongo.errors.DuplicateKeyError:
                    continue

        return self._run(stream, f"claim stream {stream!r}", fn)

    def ensure_table(self, spec: TableSpec) -> TableSpec:
        if spec.table in RESERVED and spec.stream != base.DEAD_LETTER_TABLE:
            raise DestinationError(f"the stream's collection name {spec.table!r} is one this target keeps for "
                                   f"itself; rename the stream", transient=False, stream=spec.stream)
        spec = TableSpec(spec.stream, spec.table, self.database, spec.columns, spec.key_columns, spec.metadata)

        def fn() -> TableSpec:
            catalog = self.db[CATALOG]
            doc = catalog.find_one({"_id": spec.table})
            existing = None
            if doc is not None:
                existing = TableSpec(spec.stream, spec.table, self.database,
                                     tuple(Column(n, None, t) for n, t in doc.get("columns") or []),
                                     spec.key_columns, spec.metadata)
            merged, add, change = base.merge_specs(existing, spec)
            if existing is None:
                if spec.table not in self.db.list_collection_names(filter={"name": spec.table}):
                    try:
                        self.db.create_collection(spec.table)
                    except pymongo.errors.CollectionInvalid:
                        pass  # created by another worker meanwhile
                logger.info("stream %r: created collection %s.%s", spec.stream, self.database, spec.table)
            if existing is None or add or change:
                catalog.replace_one({"_id": spec.table},
                                    {"_id": spec.table, "stream": spec.stream,
                                     "columns": [[c.name, c.type] for c in merged.columns],
                                     "key_columns": list(spec.key_columns)}, upsert=True)
                for c in add:
                    logger.info("stream %r: added field %s (%s)", spec.stream, c.name, c.type)
                for c in change:
                    logger.info("stream %r: field %s widened to %s (stored documents keep their values)",
                                spec.stream, c.name, c.type)
            return merged

        return self._run(spec.stream, f"set up collection for stream {spec.stream!r}", fn)

    # -- writing -----------------------------------------------------------------------------------
    def _ids(self, spec: TableSpec, batch: Batch, rows: list, lines: list[int], keyed: bool) -> list:
        if keyed:
            at = [spec.index(k) for k in spec.key_columns]
            convs = dict(converters(spec.columns, self.decimal128))
            conv = [convs.get(i) for i in at]
            if len(at) == 1:
                i, c = at[0], conv[0]
                return [row[i] if c is None else c(row[i]) for row in rows]
            names = spec.key_columns
            return [{n: (row[i] if c is None else c(row[i])) for n, i, c in zip(names, at, conv)} for row in rows]
        if spec.metadata:
            i = spec.index(base.SEQUENCE_COLUMN)
            if all(row[i] is not None for row in rows):
                return [row[i] for row in rows]
        if len(lines) != len(rows):
            raise DestinationError("a batch of a stream without keys came without its input lines; its documents "
                                   "have no stable id", transient=False, stream=spec.stream)
        return [batch.sequence_base + line for line in lines]

    def _bulk(self, stream: str, collection, count: int, make: Callable[[int], Any], lines: list[int],
              duplicates_exist: bool, fallback: Callable[[int], Any] | None = None) -> None:
        """Write ``count`` operations (``make(n)`` is the n-th) in unordered chunks. With ``duplicates_exist``, a
        duplicate ``_id`` is a document already there that wins: an insert of a keyless document written by an
        earlier attempt (the same input line, the same document), or a guarded replace whose stored document is
        newer, skipped after ``fallback(n)``, which replaces a stored document carrying no sequence."""
        n = 0
        while n < count:
            ops, size, first = [], 0, n
            while n < count and len(ops) < CHUNK_DOCUMENTS and size < CHUNK_BYTES:
                op, nbytes = make(n)
                ops.append(op)
                size += nbytes
                n += 1
            try:
                collection.bulk_write(ops, ordered=False)
            except pymongo.errors.BulkWriteError as exc:
                details = exc.details or {}
                stale = []
                for err in details.get("writeErrors") or []:
                    at = first + int(err.get("index", 0))
                    line = lines[at] if at < len(lines) else None
                    # The stored document is newer: the guarded replace matched nothing and its insert hit the _id
                    # (a duplicate on another unique index the user made is an error like any other).
                    if duplicates_exist and err.get("code") == DUPLICATE_KEY and \
                            err.get("keyPattern", ID_KEY) == ID_KEY:
                        stale.append(at)
                        continue
                    code = err.get("code")
                    text = _redact(str(err.get("errmsg") or "write error"), self._url)
                    raise DestinationError(f"MongoDB refused a document (code {code}): {text}",
                                           transient=code in TRANSIENT_CODES, stream=stream, line=line) from None
                if details.get("writeConcernErrors"):
                    text = _redact(str(details["writeConcernErrors"][0].get("errmsg")), self._url)
                    raise DestinationError(f"MongoDB write concern not satisfied: {text}", transient=True,
                                           stream=stream) from None
                if stale and fallback is not None:
                    replaced = 0
                    for at in stale:
                        replaced += fallback(at)
                    logger.debug("stream %r: %d documents stored with a newer _sdc_sequence kept (%d without one "
                                 "replaced)", stream, len(stale) - replaced, replaced)

    def _encode(self, stream: str, doc: dict, line: int | None) -> bytes:
        try:
            raw = bson.encode(doc)
        except (bson.errors.InvalidDocument, OverflowError) as exc:
            raise DestinationError(f"the record cannot be stored as a MongoDB document: {exc}", transient=False,
                                   stream=stream, line=line) from None
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise DestinationError(f"the record's document takes {len(raw)} bytes as BSON, over MongoDB's limit of "
                                   f"{MAX_DOCUMENT_BYTES} bytes (16 MB); leave the large property out or split "
                                   f"it in the tap", transient=False, stream=stream, line=line)
        return raw

    def write_batch(self, spec: TableSpec, batch: Batch) -> None:
        rows, lines = batch.rows, batch.lines
        keyed = batch.upsert and bool(spec.key_columns)
        if "_id" in spec.column_names and rows and not (keyed and spec.key_columns == ("_id",)):
            raise DestinationError("the stream has a property _id, which in MongoDB is the document id: it can be "
                                   "loaded only as the stream's one key property under the upsert load method; make "
                                   "_id the key, or rename the property (a stream map)", transient=False,
                                   stream=spec.stream, line=batch.first_line)
        if keyed and rows:
            base.require_keys(spec, batch)
            rows, lines = base.last_by_sequence(spec, rows, lines)
        guarded = keyed and spec.metadata
        seq_at = spec.index(base.SEQUENCE_COLUMN) if spec.metadata else None
        collection = self.db[spec.table]

        def prepared():
            try:
                ids = self._ids(spec, batch, rows, lines, keyed)
                doc = documents(spec, rows, ids, self.decimal128)
            except _Refused as exc:
                raise DestinationError(str(exc), transient=False, stream=spec.stream) from None
            return ids, doc

        ids, doc = prepared() if rows else ([], None)

        def line_of(n: int) -> int | None:
            return lines[n] if n < len(lines) else None

        def make(n: int):
            try:
                d = doc(n)
            except _Refused as exc:
                raise DestinationError(str(exc), transient=False, stream=spec.stream, line=line_of(n)) from None
            raw = self._encode(spec.stream, d, line_of(n))
            if not keyed:  # the same input line makes the same document: one already there is this one
                return InsertOne(RawBSONDocument(raw)), len(raw)
            if guarded and rows[n][seq_at] is not None:
                filt = {"_id": ids[n], base.SEQUENCE_COLUMN: {"$lte": rows[n][seq_at]}}
            else:
                filt = {"_id": ids[n]}
            return ReplaceOne(filt, RawBSONDocument(raw), upsert=True), len(raw)

        def fallback(n: int) -> int:
            res = collection.replace_one({"_id": ids[n], base.SEQUENCE_COLUMN: None}, RawBSONDocument(
                self._encode(spec.stream, doc(n), line_of(n))))
            return res.matched_count

        def fn() -> None:
            stored, fence = self._stored(batch.run_id, spec.stream)
            self._check_fence(spec.stream, fence, batch.fence)
            if base.committed_before(stored, spec.stream, batch.upto_seq, batch.has_writes):
                return
            if batch.dead_letters:
                self._write_dead_letters(batch)
            if batch.truncate_first:
                collection.delete_many({})
            if rows:
                self._bulk(spec.stream, collection, len(rows), make, lines, guarded or not keyed,
                           fallback if guarded else None)
            self._set_offset(batch.run_id, spec.stream, batch.upto_seq, batch.fence)

        self._run(spec.stream, f"write batch of stream {spec.stream!r}", fn)

    def _write_dead_letters(self, batch: Batch) -> None:
        spec = base.dead_letter_spec(self.database)
        if not self._dead_letters_ready:
            self.ensure_table(spec)
            self._dead_letters_ready = True
        names = spec.column_names
        stream_at, seq_at, line_at = spec.index("stream"), spec.index("_sdc_sequence"), spec.index("line")
        at_at = spec.index("failed_at")
        rows = batch.dead_letters

        def make(n: int):
            row = list(rows[n])
            row[at_at] = _datetime(row[at_at]) if row[at_at] is not None else None
            d = {"_id": f"{row[stream_at]}/{row[seq_at]}"}
            d.update(zip(names, row))
            raw = self._encode(str(row[stream_at]), d, row[line_at])
            return ReplaceOne({"_id": d["_id"]}, RawBSONDocument(raw), upsert=True), len(raw)

        self._bulk(base.DEAD_LETTER_TABLE, self.db[base.DEAD_LETTER_TABLE], len(rows), make,
                   [r[line_at] for r in rows], duplicates_exist=False)

    def activate_version(self, spec: TableSpec, version: int, *, run_id: str, upto_seq: int, fence: int,
                         hard_delete: bool, deleted_at: str) -> None:
        if not spec.metadata:
            logger.warning("stream %r: ACTIVATE_VERSION ignored: add_record_metadata is off, so documents carry "
                           "no _sdc_table_version", spec.stream)
        older = {"$or": [{base.VERSION_COLUMN: None}, {base.VERSION_COLUMN: {"$lt": int(version)}}]}
        collection = self.db[spec.table]

        def fn() -> None:
            self._check_fence(spec.stream, self._stored(run_id, spec.stream)[1], fence)
            if spec.metadata:
                if hard_delete:
                    res = collection.delete_many(older)
                    logger.info("stream %r: version %d active, %d older documents deleted", spec.stream, version,
                                res.deleted_count)
                else:
                    res = collection.update_many({**older, base.DELETED_COLUMN: None},
                                                 {"$set": {base.DELETED_COLUMN: _datetime(deleted_at)}})
                    logger.info("stream %r: version %d active, %d older documents marked deleted", spec.stream,
                                version, res.modified_count)
            self._set_offset(run_id, spec.stream, upto_seq, fence)

        self._run(spec.stream, f"activate version {version} of stream {spec.stream!r}", fn)

    def close(self) -> None:
        self.client.close()
