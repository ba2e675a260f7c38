"""Singer messages, parsed once into typed values (plain slotted dataclasses: one is made per input line, and
a frozen dataclass's ``__init__`` costs four times as much).

Every message carries ``seq``: its input line number, which is also its position in the input and
the sequence number the sinks use to skip redelivered work (DESIGN rule 4).

``parse_line`` is the single place that turns a line of tap output into a message; the workers use it
to rebuild the messages they receive, the feeder to route and check every line but the plainest RECORD
lines: those it routes by ``record_stream``, which reads the stream name off the line's head without
parsing it, and the worker's parse checks them (a RECORD line would otherwise be parsed twice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

import orjson

from .errors import InputError

FIX_TAP = "The tap's output is not valid Singer; fix the tap or the file and run again"


@dataclass(slots=True)
class Schema:
    stream: str
    schema: dict
    key_properties: tuple[str, ...]
    bookmark_properties: tuple[str, ...]
    seq: int


@dataclass(slots=True)
class Record:
    stream: str
    record: dict
    seq: int
    time_extracted: str | None = None
    version: int | None = None


@dataclass(slots=True)
class State:
    value: Any
    seq: int


@dataclass(slots=True)
class ActivateVersion:
    stream: str
    version: int
    seq: int


@dataclass(slots=True)
class BatchFiles:
    """singer-sdk BATCH message: records stored in files listed by a manifest."""

    stream: str
    format: str
    compression: str | None
    manifest: tuple[str, ...]
    seq: int


Message = Union[Schema, Record, State, ActivateVersion, BatchFiles]
STREAM_MESSAGES = (Schema, Record, ActivateVersion, BatchFiles)


_RECORD_HEAD = re.compile(rb'\{\s*"type"\s*:\s*"RECORD"\s*,\s*"stream"\s*:\s*"([^"\\]+)"\s*,')


def record_stream(raw: bytes) -> str | None:
    """The stream of a line that starts ``{"type": "RECORD", "stream": "<name>",`` (as singer-python and
    singer-sdk write them), read without parsing the line; None for any other line, which must be parsed.

    Only the head is read: the rest of the line is checked where it is parsed (``parse_line`` in the
    worker), which also checks that the parsed message names this stream.
    """
    m = _RECORD_HEAD.match(raw)
    if m is None:
        return None
    try:
        return m.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _stream(obj: dict, kind: str, line: int) -> str:
    stream = obj.get("stream")
    if not isinstance(stream, str) or not stream:
        raise InputError(f'{kind} message has no "stream" name', line=line, hint=FIX_TAP)
    return stream


def _str_list(value: Any, field: str, kind: str, line: int, stream: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f'{kind} field "{field}" must be a list of property names', line=line,
                         stream=stream, hint=FIX_TAP)
    return tuple(value)


def _decode_error(raw: bytes, line: int, exc: Exception) -> InputError:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as ude:
        return InputError(f"invalid UTF-8 at byte {ude.start} of the line", line=line, hint=FIX_TAP)
    return InputError(f"malformed JSON ({exc})", line=line, hint=FIX_TAP)


def parse_line(raw: bytes, line: int, allow_unknown: bool = False) -> Message | None:
    """Parse one line of tap output. Raises ``InputError`` naming the line (and stream) on bad input.

    Returns None for a message of unknown type when ``allow_unknown`` is set.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(raw, line, exc) from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", line=line, hint=FIX_TAP)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise InputError('message has no "type"', line=line, hint=FIX_TAP)
    kind = kind.upper()
    if kind == "RECORD":
        stream = _stream(obj, kind, line)
        record = obj.get("record")
        if not isinstance(record, dict):
            raise InputError('RECORD has no "record" object', line=line, stream=stream, hint=FIX_TAP)
        version = obj.get("version")
        if version is not None and not isinstance(version, int):
            raise InputError('RECORD "version" must be an integer', line=line, stream=stream, hint=FIX_TAP)
        te = obj.get("time_extracted")
        return Record(stream, record, line, te if isinstance(te, str) else None, version)
    if kind == "SCHEMA":
        stream = _stream(obj, kind, line)
        schema = obj.get("schema")
        if not isinstance(schema, dict):
            raise InputError('SCHEMA has no "schema" object', line=line, stream=stream, hint=FIX_TAP)
        keys = _str_list(obj.get("key_properties"), "key_properties", kind, line, stream)
        props = schema.get("properties")
        if props is None:
            # Columns come from the declared properties only: every value of such a stream would be lost.
            raise InputError('SCHEMA has no "properties": its records would load without any of their values',
                             line=line, stream=stream,
                             hint='Declare the stream\'s fields under "properties" in the tap\'s schema (a '
                                  'nested object may go without them: it loads as one JSON column)')
        if not isinstance(props, dict):
            raise InputError('SCHEMA "properties" must be an object', line=line, stream=stream, hint=FIX_TAP)
        missing = [k for k in keys if k not in props]
        if missing:
            raise InputError(f"key properties {missing} are not in the schema's properties", line=line,
                             stream=stream, hint=FIX_TAP)
        bookmarks = _str_list(obj.get("bookmark_properties"), "bookmark_properties", kind, line, stream)
        return Schema(stream, schema, keys, bookmarks, line)
    if kind == "STATE":
        if "value" not in obj:
            raise InputError('STATE has no "value"', line=line, hint=FIX_TAP)
        return State(obj["value"], line)
    if kind == "ACTIVATE_VERSION":
        stream = _stream(obj, kind, line)
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise InputError('ACTIVATE_VERSION needs an integer "version"', line=line, stream=stream,
                             hint=FIX_TAP)
        return ActivateVersion(stream, version, line)
    if kind == "BATCH":
        stream = _stream(obj, kind, line)
        encoding = obj.get("encoding")
        manifest = obj.get("manifest")
        if not isinstance(encoding, dict) or not isinstance(encoding.get("format"), str):
            raise InputError('BATCH needs an "encoding" object with a "format"', line=line, stream=stream,
                             hint=FIX_TAP)
        fmt = encoding["format"].lower()
        if fmt != "jsonl":
            raise InputError(f"BATCH format {fmt!r} is not supported (supported: jsonl)", line=line,
                             stream=stream, hint="Configure the tap's batch_config to write jsonl")
        compression = encoding.get("compression")
        if compression not in (None, "none", "gzip"):
            raise InputError(f"BATCH compression {compression!r} is not supported (supported: gzip, none)",
                             line=line, stream=stream, hint="Configure the tap to write gzip or plain files")
        if not isinstance(manifest, list) or not all(isinstance(m, str) for m in manifest):
            raise InputError('BATCH needs a "manifest" list of file URLs', line=line, stream=stream,
                             hint=FIX_TAP)
        for url in manifest:
            if not (url.startswith("file://") or "://" not in url):
                raise InputError(f"BATCH manifest entry {url!r} is not a local file (file://)", line=line,
                                 stream=stream, hint="Only file:// manifests are supported")
        return BatchFiles(stream, fmt, None if compression in (None, "none") else compression,
                          tuple(manifest), line)
    if allow_unknown:
        return None
    raise InputError(f"unknown message type {obj.get('type')!r}", line=line,
                     stream=obj.get("stream") if isinstance(obj.get("stream"), str) else None,
                     hint="Known types: SCHEMA, RECORD, STATE, ACTIVATE_VERSION, BATCH; "
                          "set allow_unknown_message_types to skip others")
