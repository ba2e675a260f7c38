"""singer-sdk's standard target test streams: what each must load, or the error it must fail with.

The streams come from the singer-sdk wheel (downloaded once by pip into .cache/); the conformance suite
(tests/test_conformance.py) loads them into every destination through the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from .conftest import PG_DSN

pytestmark = pytest.mark.integration

MUST_FAIL = {
    "record_before_schema.singer": "RECORD before any SCHEMA",
    "record_missing_key_property.singer": "key property",
    "record_missing_required_property.singer": "'id' is a required property",
    # A SCHEMA with no "properties" at all, which singer-sdk's TargetInvalidSchemaTest expects a target to refuse:
    # no value of its records would load.
    "invalid_schema.singer": "input line 1, stream 'test_invalid_schema': SCHEMA has no \"properties\"",
}
ROWS = {
    "array_data.singer": {"test_array_data": 4},
    "camelcase.singer": {"testcamelcase": 2},
    "camelcase_complex_schema.singer": {"forecastingtypetocategory": 0},
    "duplicate_records.singer": {"test_duplicate_records": 2},
    "encoded_string_data.singer": {"test_strings": 11, "test_strings_in_objects": 11, "test_strings_in_arrays": 6},
    "multiple_state_messages.singer": {"test_multiple_state_messages_a": 6, "test_multiple_state_messages_b": 6},
    "no_primary_keys.singer": {"test_no_pk": 3},
    "no_primary_keys_append.singer": {"test_no_pk": 5},
    "optional_attributes.singer": {"test_optional_attributes": 4},
    "pk_updates.singer": {"example_stream": 2},
    "record_missing_fields.singer": {"record_missing_fields": 2},
    "schema_no_properties.singer": {"test_object_schema_with_properties": 2, "test_object_schema_no_properties": 2},
    "schema_updates.singer": {"test_schema_updates": 6},
    "special_chars_in_attributes.singer": {"test_specialchars_in_attributes": 1},
    "user_location_data.singer": {"test_users": 5, "test_locations": 3, "test_user_in_location": 3},
    "user_location_upsert_data.singer": {"test_users": 6, "test_locations": 4, "test_user_in_location": 4},
}


def _run(cli, tmp_path, path: Path, schema: str):
    config = tmp_path / "target.json"
    config.write_text(json.dumps({"destination": "postgres", "default_target_schema": schema}))
    return cli(["--config", str(config), "--input", str(path)], env={"SINGER_INGEST_POSTGRES_DSN": PG_DSN},
               cwd=tmp_path)


def test_every_stream_file_is_covered(sdk_streams):
    assert {p.name for p in sdk_streams.glob("*.singer")} == set(ROWS) | set(MUST_FAIL)


def test_a_nested_object_without_properties_loads_its_whole_value(cli, tmp_path, sdk_streams, pg_schema):
    """schema_no_properties.singer: only a nested object lacks properties; its values load as JSON."""
    path = sdk_streams / "schema_no_properties.singer"
    expected = {}
    for line in path.read_text().splitlines():
        msg = json.loads(line)
        if msg["type"] == "RECORD":
            expected.setdefault(msg["stream"], []).append(msg["record"]["object_store"])
    assert len(expected) == 2
    result = _run(cli, tmp_path, path, pg_schema)
    assert result.returncode == 0, result.stderr
    assert "not declared" not in result.stderr
    con = psycopg2.connect(PG_DSN)
    try:
        with con.cursor() as cur:
            for table, values in expected.items():
                cur.execute(sql.SQL("SELECT object_store FROM {}.{} ORDER BY _sdc_sequence").format(
                    sql.Identifier(pg_schema), sql.Identifier(table)))
                assert [r[0] for r in cur.fetchall()] == values, table
    finally:
        con.close()
