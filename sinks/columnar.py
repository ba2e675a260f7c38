"""A batch as an Arrow table, for the destinations that load Arrow or Parquet natively.

``arrow_table(spec, rows)`` builds one ``pyarrow.Table`` with a column per ``spec.columns`` entry, typed by its
logical type; ``Batch.arrow(spec)`` builds it once per batch and keeps it, so a destination that writes it
twice (a Parquet file and a staging load, say) converts once. pyarrow comes with the extras of the destinations
that need it; the embedded default does not install it.

Types: integer -> int64, number -> float64 (a column of integers widened to number keeps each value that a
double holds), string -> string, boolean -> bool, date-time -> timestamp[us, UTC] (ISO 8601 with an offset or
``Z``; a value without one is taken as UTC), date -> date32, time -> time64[us], JSON -> string holding the
JSON text (each destination casts it to its own JSON type).
"""

from __future__ import annotations

from datetime import date, datetime, time, timezone
from typing import TYPE_CHECKING, Any

import orjson

from ingest.errors import DestinationError

from . import base

if TYPE_CHECKING:
    import pyarrow

    from .base import TableSpec


def _pa():
    try:
        import pyarrow
        import pyarrow.compute
    except ImportError:
        raise DestinationError("this destination needs pyarrow, which is not installed where the worker runs; "
                               "install the destination's extra (pip install 'singer-ingest[NAME]')",
                               transient=False) from None
    return pyarrow


def arrow_type(logical: str) -> "pyarrow.DataType":
    pa = _pa()
    return {base.INTEGER: pa.int64(), base.NUMBER: pa.float64(), base.STRING: pa.string(), base.BOOLEAN: pa.bool_(),
            base.TIMESTAMP: pa.timestamp("us", tz="UTC"), base.DATE: pa.date32(), base.TIME: pa.time64("us"),
            base.JSON: pa.string()}[logical]


def _parse_one(value: Any, logical: str) -> Any:
    if value is None or not isinstance(value, str):
        return value
    if logical == base.TIMESTAMP:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    if logical == base.DATE:
        return date.fromisoformat(value[:10])
    return time.fromisoformat(value)


def _column(values: list, logical: str, stream: str, name: str) -> "pyarrow.Array":
    pa = _pa()
    target = arrow_type(logical)
    try:
        if logical == base.JSON:
            return pa.array([None if v is None else orjson.dumps(v).decode() for v in values], pa.string())
        if logical in (base.TIMESTAMP, base.DATE, base.TIME):
            text = pa.array(values, pa.string())
            try:
                return pa.compute.cast(text, target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a value the fast cast does not read
                return pa.array([_parse_one(v, logical) for v in values], target)
        return pa.array(values, target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, orjson.JSONEncodeError) as exc:
        raise DestinationError(f"column {name!r} cannot be converted to {target}: {exc}", transient=False,
                               stream=stream) from None


def arrow_table(spec: "TableSpec", rows: list) -> "pyarrow.Table":
    pa = _pa()
    columns = list(zip(*rows)) if rows else [() for _ in spec.columns]
    arrays = [_column(list(values), c.type, spec.stream, c.name) for c, values in zip(spec.columns, columns)]
    return pa.Table.from_arrays(arrays, names=list(spec.column_names))
