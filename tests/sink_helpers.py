"""What the sink tests of every destination build their tables and batches from."""

from __future__ import annotations

from sinks import base
from sinks.base import Batch

SCHEMA = {"properties": {
    "id": {"type": "integer"}, "price": {"type": ["null", "number"], "multipleOf": 0.01},
    "name": {"type": ["null", "string"]}, "ok": {"type": ["null", "boolean"]},
    "at": {"type": ["null", "string"], "format": "date-time"}, "day": {"type": ["null", "string"], "format": "date"},
    "clock": {"type": ["null", "string"], "format": "time"}, "doc": {"type": ["null", "object"]},
    "tags": {"type": ["null", "array"]}}}


def spec_for(dest, stream="items", schema=SCHEMA, keys=("id",), metadata=False):
    return dest.ensure_table(base.table_spec(stream, schema, keys, metadata=metadata, schema_name=None,
                                             max_identifier_bytes=dest.max_identifier_bytes))


def row(spec, seq=None, **values):
    """A row in the spec's column order: values by property name, ``seq`` as its _sdc_sequence."""
    return tuple(seq if c.name == base.SEQUENCE_COLUMN else values.get(c.prop or c.name) for c in spec.columns)


def batch(rows, upto, fence=1, upsert=True, run="r1", lines=None, **kw):
    return Batch(rows=list(rows), upto_seq=upto, run_id=run, fence=fence, upsert=upsert,
                 lines=lines or list(range(1, len(rows) + 1)), first_line=(lines or [1])[0], **kw)


# A record's JSON text with what every load path must keep: a tab (between tokens), JSON escapes (backslashes),
# quotes, a 4-byte character.
TRICKY_RECORD = '{"id":\t"x\\ty", "note": "a\\nb \\\\ \\"q\\" \'s\' 😀"}'
FAILED_AT = "2024-05-05T06:07:08.123456+00:00"


def dead_letter(line, stream="items", run="r1", reason="schema", record=None, sequence_base=1000):
    """A row of ``base.dead_letter_spec`` in its column order, for input line ``line``."""
    return (stream, line, sequence_base + line, run, reason, f"line {line}: 'id' is not of type 'integer'",
            TRICKY_RECORD if record is None else record, FAILED_AT)


def dead_letter_key(letter) -> tuple:
    """(stream, line, _sdc_sequence, run_id, reason, error, record) of a dead letter, without failed_at."""
    return tuple(letter[:7])
