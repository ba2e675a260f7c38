"""What a destination must hold after loading a .singer input: a small, obviously-correct model.

For each stream: keyed streams keep the last record of each key (input order), keyless streams keep
every record. Values are normalised for comparison: date-times become UTC microseconds since the
epoch, JSON values their parsed form, numbers floats.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import orjson


def _ts_us(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return round(value.timestamp() * 1_000_000)


def model(data: bytes) -> dict[str, dict]:
    """stream -> {"keys": [...], "props": {name: schema}, "rows": [record, ...], "last_state": value}"""
    streams: dict[str, dict] = {}
    last_state = None
    for raw in data.splitlines():
        if not raw.strip():
            continue
        msg = orjson.loads(raw)
        kind = msg["type"].upper()
        if kind == "SCHEMA":
            s = streams.setdefault(msg["stream"], {"keys": [], "props": {}, "by_key": {}, "rows": []})
            s["keys"] = msg.get("key_properties") or []
            s["props"].update(msg["schema"].get("properties", {}))
        elif kind == "RECORD":
            s = streams[msg["stream"]]
            if s["keys"]:
                s["by_key"][tuple(msg["record"].get(k) for k in s["keys"])] = msg["record"]
            else:
                s["rows"].append(msg["record"])
        elif kind == "STATE":
            last_state = msg["value"]
    for s in streams.values():
        if s["keys"]:
            s["rows"] = list(s.pop("by_key").values())
        else:
            s.pop("by_key")
        s["last_state"] = last_state
    return streams


def _kind(prop: dict) -> str:
    types = prop.get("type")
    types = [types] if isinstance(types, str) else [t for t in (types or []) if t != "null"]
    if types == ["string"] and prop.get("format") == "date-time":
        return "ts"
    if types == ["string"] and prop.get("format") in ("date", "time"):
        return "isotext"
    if types and set(types) <= {"integer", "number"}:
        return "num"
    if types and types[0] in ("object", "array"):
        return "json"
    return "plain"


def normalise(value, kind: str):
    if value is None:
        return None
    if kind == "ts":
        return _ts_us(value)
    if kind == "num":
        return float(value)
    if kind == "isotext":
        return value if isinstance(value, str) else value.isoformat()
    if kind == "json":
        return orjson.loads(value) if isinstance(value, (str, bytes)) else value
    return value


def expected_rows(stream: dict) -> list[dict]:
    kinds = {p: _kind(schema) for p, schema in stream["props"].items()}
    return [{p: normalise(r.get(p), k) for p, k in kinds.items()} for r in stream["rows"]]


def duckdb_rows(path: str, table: str, stream: dict) -> list[dict]:
    """Rows of a DuckDB table, normalised like ``expected_rows`` (property names are column names)."""
    import duckdb

    kinds = {p: _kind(schema) for p, schema in stream["props"].items()}
    select = []
    for p, k in kinds.items():
        col = '"' + p.replace('"', '""') + '"'
        select.append(f"epoch_us({col})" if k == "ts" else f"{col}::VARCHAR" if k == "json" else col)
    deadline = time.monotonic() + 15
    while True:
        try:
            con = duckdb.connect(path, read_only=True)
            break
        except duckdb.IOException as exc:
            # A worker that joined the run as it ended may hold the file for the moment it takes to open it
            # (each worker process opens a shared DuckDB file for one transaction at a time).
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        rows = con.execute(f'SELECT {", ".join(select)} FROM "{table}"').fetchall()
    finally:
        con.close()
    names = list(kinds)
    return [{n: (normalise(v, kinds[n]) if kinds[n] != "ts" else v) for n, v in zip(names, row)} for row in rows]


def sort_key(keys: list[str]):
    def key(row: dict):
        if keys:
            return tuple(str(row.get(k)) for k in keys)
        return orjson.dumps(row, option=orjson.OPT_SORT_KEYS)
    return key


def assert_same_rows(actual: list[dict], expected: list[dict], keys: list[str], stream: str) -> None:
    assert len(actual) == len(expected), f"stream {stream}: {len(actual)} rows loaded, {len(expected)} expected"
    a = sorted(actual, key=sort_key(keys))
    e = sorted(expected, key=sort_key(keys))
    for i, (x, y) in enumerate(zip(a, e)):
        assert x == y, f"stream {stream}: row {i} differs:\n loaded   {x}\n expected {y}"


def postgres_rows(dsn: str, schema: str, table: str, stream: dict) -> list[dict]:
    """Rows of a PostgreSQL table, normalised like ``expected_rows``."""
    import psycopg2
    from psycopg2 import sql

    kinds = {p: _kind(s) for p, s in stream["props"].items()}
    cols = []
    for p, k in kinds.items():
        ident = sql.Identifier(p)
        cols.append(sql.SQL("(extract(epoch from {}) * 1000000)::bigint").format(ident) if k == "ts" else ident)
    query = sql.SQL("SELECT {} FROM {}.{}").format(sql.SQL(", ").join(cols), sql.Identifier(schema),
                                                   sql.Identifier(table))
    with psycopg2.connect(dsn) as con, con.cursor() as cur:
        cur.execute(query)
        rows = cur.fetchall()
    con.close()
    names = list(kinds)
    return [{n: (normalise(v, kinds[n]) if kinds[n] != "ts" else v) for n, v in zip(names, row)} for row in rows]


def _mysql_time(value) -> str:
    """A TIME value (PyMySQL reads it as a timedelta) as ISO 8601 text."""
    seconds = int(value.total_seconds())
    text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return text + f".{value.microseconds:06d}" if value.microseconds else text


def mysql_rows(url: str, database: str, table: str, stream: dict) -> list[dict]:
    """Rows of a MySQL/MariaDB table, normalised like ``expected_rows`` (``url``: mysql://user:password@host:port/).
    DATETIME holds UTC; TINYINT(1) columns of boolean properties are read back as booleans."""
    from datetime import timedelta
    from urllib.parse import unquote, urlsplit

    import pymysql

    kinds = {p: _kind(s) for p, s in stream["props"].items()}
    booleans = {p for p, s in stream["props"].items()
                if [t for t in ([s.get("type")] if isinstance(s.get("type"), str) else s.get("type") or [])
                    if t != "null"] == ["boolean"]}
    cols = ", ".join("`" + p.replace("`", "``") + "`" for p in kinds)
    u = urlsplit(url)
    con = pymysql.connect(host=u.hostname or "127.0.0.1", port=u.port or 3306, user=unquote(u.username or "root"),
                          password=unquote(u.password or ""), charset="utf8mb4", autocommit=True)
    try:
        with con.cursor() as cur:
            cur.execute(f"SELECT {cols} FROM `{database.replace('`', '``')}`.`{table.replace('`', '``')}`")
            rows = cur.fetchall()
    finally:
        con.close()
    names = list(kinds)
    out = []
    for row in rows:
        values = {}
        for n, v in zip(names, row):
            if v is not None and n in booleans:
                v = bool(v)
            elif isinstance(v, timedelta):
                v = _mysql_time(v)
            values[n] = normalise(v, kinds[n])
        out.append(values)
    return out
