"""Records the destination refuses, set aside under bad_records=dead_letter: PostgreSQL through the CLI."""

from __future__ import annotations

import json

import pytest

from .conftest import PG_DSN
from .destinations import pg_query

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.mark.parametrize("keys", [["id"], []])
def test_a_value_postgresql_refuses_goes_to_the_dead_letter_table(cli, tmp_path, pg_schema, keys):
    schema = {"type": "object", "properties": {"id": {"type": "integer"}, "n": {"type": ["null", "integer"]}}}
    # Unvalidated (validate_records off): PostgreSQL's bigint column is what refuses the two strings.
    records = [{"id": i, "n": f"#{i}" if i in (3, 7) else i} for i in range(1, 11)]
    data = b"".join(json.dumps(m).encode() + b"\n" for m in [
        {"type": "SCHEMA", "stream": "nums", "schema": schema, "key_properties": keys},
        *[{"type": "RECORD", "stream": "nums", "record": r} for r in records],
        {"type": "STATE", "value": {"at": 10}}])
    config = tmp_path / "target.json"
    config.write_text(json.dumps({"destination": "postgres", "postgres_dsn": PG_DSN,
                                  "default_target_schema": pg_schema, "bad_records": "dead_letter",
                                  "batch_size_rows": 6, "validate_records": False}))
    result = cli(["--config", str(config)], input_bytes=data)
    assert result.returncode == 0, result.stderr
    assert result.states == [{"at": 10}]
    assert pg_query(f'SELECT id, n FROM "{pg_schema}".nums ORDER BY id') == \
        [(r["id"], r["n"]) for r in records if r["id"] not in (3, 7)]
    dead = pg_query(f'SELECT stream, line, reason, error, record FROM "{pg_schema}"._singer_ingest_dead_letter '
                    f'ORDER BY line')
    assert [d[:3] for d in dead] == [("nums", 4, "destination"), ("nums", 8, "destination")]
    assert all("bigint" in d[3] for d in dead), dead
    assert [json.loads(d[4]) for d in dead] == [records[2], records[6]]
    assert "nums: 2" in result.stderr.strip().splitlines()[-1]
