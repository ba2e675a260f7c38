"""The bigquery destination beyond the conformance suite, on the local BigQuery server (tests/bqserver.py):
dead letters in the batch's own transaction, types, column names BigQuery reserves, a new column under an
upsert, columns widened to string and JSON, the fence of a claim, how errors are classed, and config errors."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
from google.api_core import exceptions as gexc

from ingest.errors import DestinationError, Fenced
from sinks import base
from sinks.base import Batch

from .destinations import BigQueryHarness

pytestmark = pytest.mark.bigquery  # and integration, for every test on the server (the last one is pure)

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "v": {"type": ["null", "string"]}}}


@pytest.fixture()
def bq(tmp_path):
    harness = BigQueryHarness(tmp_path)
    yield harness
    harness.cleanup()


def _spec(d, schema=SCHEMA, keys=("id",), stream="items"):
    return d.ensure_table(base.table_spec(stream, schema, keys, metadata=True, schema_name=None,
                                          max_identifier_bytes=d.max_identifier_bytes))


def _rows(spec, records: list[dict]) -> list[tuple]:
    return [tuple(r.get(c.prop or c.name) for c in spec.columns) for r in records]


def _dead(stream: str, line: int, run_id: str = "r1") -> tuple:
    """A dead-letter row in ``dead_letter_spec`` column order."""
    return (stream, line, line, run_id, "schema", f"record at line {line} failed its schema",
            '{"id": "x"}', "2024-05-01T00:00:00+00:00" if line % 2 else datetime(2024, 5, 1, tzinfo=timezone.utc))


@pytest.mark.integration
def test_dead_letters_commit_with_the_batch_and_a_replay_doubles_nothing(bq, caplog):
    caplog.set_level(logging.WARNING)
    d = bq.open()
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        rows = _rows(spec, [{"id": 1, "v": "a", "_sdc_sequence": 1}, {"id": 3, "v": "c", "_sdc_sequence": 3}])
        batch = Batch(rows=rows, upto_seq=3, run_id="r1", fence=1, upsert=True, lines=[1, 3],
                      dead_letters=[_dead("items", 2)])
        d.write_batch(spec, batch)
        d.write_batch(spec, batch)  # its acknowledgement was lost: written again
        # A batch of dead letters only moves the offset too, and is not written twice either.
        only_dead = Batch(rows=[], upto_seq=5, run_id="r1", fence=1, upsert=True, lines=[],
                          dead_letters=[_dead("items", 4), _dead("items", 5)])
        d.write_batch(spec, only_dead)
        d.write_batch(spec, only_dead)
        assert d.claim_stream("r1", "items", 2) == 5
        # A stale owner's dead letters are refused with its rows.
        with pytest.raises(Fenced):
            d.write_batch(spec, Batch(rows=[], upto_seq=6, run_id="r1", fence=1, upsert=True, lines=[],
                                      dead_letters=[_dead("items", 6)]))
    finally:
        d.close()
    assert sorted((r["id"], r["v"]) for r in bq.rows("items")) == [(1, "a"), (3, "c")]
    dead = bq.rows(base.DEAD_LETTER_TABLE)
    assert sorted((r["stream"], r["line"], r["_sdc_sequence"]) for r in dead) == \
        [("items", 2, 2), ("items", 4, 4), ("items", 5, 5)]
    assert {r["reason"] for r in dead} == {"schema"} and dead[0]["record"] == '{"id": "x"}'
    assert bq.columns(base.DEAD_LETTER_TABLE)["failed_at"] == base.TIMESTAMP
    assert caplog.text.count("committed by an earlier attempt whose acknowledgement was lost") == 2


@pytest.mark.integration
def test_types_json_timestamp_date_time_and_boolean_round_trip(bq):
    schema = {"type": "object", "properties": {
        "id": {"type": "integer"}, "n": {"type": ["null", "number"]}, "ok": {"type": ["null", "boolean"]},
        "at": {"type": ["null", "string"], "format": "date-time"}, "day": {"type": ["null", "string"], "format": "date"},
        "clock": {"type": ["null", "string"], "format": "time"}, "obj": {"type": ["null", "object"]},
        "arr": {"type": ["null", "array"]}, "big": {"type": ["null", "object"]}}}
    d = bq.open()
    try:
        spec = _spec(d, schema, stream="typed")
        d.claim_stream("r1", "typed", 1)
        rows = _rows(spec, [{"id": 1, "n": 19.99, "ok": True, "at": "2024-02-29T23:59:59.123456+02:00",
                             "day": "2024-02-29", "clock": "12:34:56.789", "obj": {"a": [1, {"b": None}], "c": "é"},
                             "arr": [1, "two", 3.5], "big": {"n": 9007199254740993}, "_sdc_sequence": 1}])
        d.write_batch(spec, Batch(rows=rows, upto_seq=1, run_id="r1", fence=1, upsert=True, lines=[1]))
    finally:
        d.close()
    cols = bq.columns("typed")
    assert (cols["n"], cols["ok"], cols["at"], cols["day"], cols["clock"], cols["obj"], cols["arr"]) == \
        (base.NUMBER, base.BOOLEAN, base.TIMESTAMP, base.DATE, base.TIME, base.JSON, base.JSON)
    (row,) = bq.rows("typed")
    assert row["n"] == 19.99 and row["ok"] is True
    assert row["at"] == round(datetime(2024, 2, 29, 21, 59, 59, 123456, tzinfo=timezone.utc).timestamp() * 1e6)
    assert (row["day"], row["clock"]) == ("2024-02-29", "12:34:56.789000")
    assert row["obj"] == {"a": [1, {"b": None}], "c": "é"} and row["arr"] == [1, "two", 3.5]
    assert float(row["big"]["n"]) == float(9007199254740993)  # rounded to a double, not refused


@pytest.mark.integration
def test_a_new_column_under_an_upsert_merges_and_keeps_older_rows(bq):
    d = bq.open()
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        d.write_batch(spec, Batch(rows=_rows(spec, [{"id": 1, "v": "a", "_sdc_sequence": 1},
                                                    {"id": 2, "v": "b", "_sdc_sequence": 2}]),
                                  upto_seq=2, run_id="r1", fence=1, upsert=True, lines=[1, 2]))
        wider = {"type": "object", "properties": {**SCHEMA["properties"], "extra": {"type": ["null", "integer"]}}}
        spec = _spec(d, wider)
        assert "extra" in spec.column_names
        d.write_batch(spec, Batch(rows=_rows(spec, [{"id": 2, "v": "b2", "extra": 7, "_sdc_sequence": 3},
                                                    {"id": 3, "v": "c", "extra": 8, "_sdc_sequence": 4}]),
                                  upto_seq=4, run_id="r1", fence=1, upsert=True, lines=[3, 4]))
    finally:
        d.close()
    assert sorted((r["id"], r["v"], r["extra"]) for r in bq.rows("items")) == \
        [(1, "a", None), (2, "b2", 7), (3, "c", 8)]


@pytest.mark.integration
def test_column_names_with_a_prefix_bigquery_reserves_are_stored_with_a_leading_x(bq):
    schema = {"type": "object", "properties": {"id": {"type": "integer"}, "_TABLE_name": {"type": "string"},
                                               "_partitiontime": {"type": "string"}}}
    d = bq.open()
    try:
        spec = _spec(d, schema, stream="reserved")
        assert {"x_table_name", "x_partitiontime"} <= set(spec.column_names)
        d.claim_stream("r1", "reserved", 1)
        d.write_batch(spec, Batch(rows=_rows(spec, [{"id": 1, "_TABLE_name": "t", "_partitiontime": "p",
                                                     "_sdc_sequence": 1}]),
                                  upto_seq=1, run_id="r1", fence=1, upsert=True, lines=[1]))
    finally:
        d.close()
    (row,) = bq.rows("reserved")
    assert (row["x_table_name"], row["x_partitiontime"]) == ("t", "p")


@pytest.mark.integration
def test_a_claim_with_a_lower_fence_is_refused_and_a_claim_keeps_the_offset(bq):
    d = bq.open()
    try:
        spec = _spec(d)
        assert d.claim_stream("r1", "items", 5) == 0
        d.write_batch(spec, Batch(rows=_rows(spec, [{"id": 1, "v": "a", "_sdc_sequence": 7}]), upto_seq=7,
                                  run_id="r1", fence=5, upsert=True, lines=[7]))
        with pytest.raises(Fenced):
            d.claim_stream("r1", "items", 4)
        assert d.claim_stream("r1", "items", 5) == 7
        assert d.claim_stream("r2", "items", 1) == 0  # another run of the same stream starts from nothing
    finally:
        d.close()


@pytest.mark.integration
def test_a_null_key_is_refused_naming_the_stream_and_the_line_and_nothing_is_written(bq):
    d = bq.open()
    try:
        spec = _spec(d)
        d.claim_stream("r1", "items", 1)
        with pytest.raises(DestinationError) as info:
            d.write_batch(spec, Batch(rows=_rows(spec, [{"id": None, "v": "a", "_sdc_sequence": 9}]), upto_seq=9,
                                      run_id="r1", fence=1, upsert=True, lines=[9]))
    finally:
        d.close()
    assert not info.value.transient and info.value.line == 9 and info.value.stream == "items"
    assert bq.count("items") == 0


def test_errors_are_classed_transient_or_terminal():
    from sinks.bigquery.destination import _translate

    def classed(exc):
        out = _translate(exc, "s")
        return "fenced" if isinstance(out, Fenced) else out.transient

    assert classed(gexc.ServiceUnavailable("backend down")) is True
    assert classed(gexc.TooManyRequests("slow down")) is True
    assert classed(gexc.Forbidden("quota", errors=[{"reason": "rateLimitExceeded"}])) is True
    assert classed(gexc.BadRequest("Transaction is aborted due to concurrent update against table x")) is True
    assert classed(ConnectionError("connection reset by peer")) is True
    assert classed(gexc.BadRequest("Invalid value for type INT64")) is False
    assert classed(gexc.BadRequest("singer-ingest fenced: another worker took this stream over (fence 3 > 2)")) \
        == "fenced"
    refused = _translate(gexc.Forbidden("Access Denied: Table x: User does not have permission"), "s")
    assert not refused.transient and "bigquery_credentials_path" in refused.what


def test_settings_that_cannot_work_are_one_clear_config_error(tmp_path):
    from ingest.errors import ConfigError
    from sinks.bigquery.destination import BigQueryDestination

    with pytest.raises(ConfigError, match="needs bigquery_project with bigquery_api_endpoint"):
        BigQueryDestination(project=None, dataset="x", api_endpoint="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"cannot read the service-account key in bigquery_credentials_path"):
        BigQueryDestination(project="p", dataset="x", credentials_path=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"type": "service_account"}')
    with pytest.raises(ConfigError, match="cannot read the service-account key") as info:
        BigQueryDestination(project="p", dataset="x", credentials_path=str(tmp_path / "bad.json"))
    assert "service_account" not in str(info.value)  # the key's contents never reach a message


@pytest.mark.integration
def test_a_column_widened_to_string_or_json_keeps_its_values(bq):
    v1 = {"type": "object", "properties": {"id": {"type": "integer"}, "n": {"type": ["null", "integer"]},
                                           "ok": {"type": ["null", "boolean"]}, "s": {"type": ["null", "string"]}}}
    v2 = {"type": "object", "properties": {"id": {"type": "integer"}, "n": {"type": ["null", "string"]},
                                           "ok": {"type": ["null", "string"]}, "s": {"type": ["null", "array"]}}}
    d = bq.open()
    try:
        spec = _spec(d, v1, stream="wide")
        d.claim_stream("r1", "wide", 1)
        d.write_batch(spec, Batch(rows=_rows(spec, [{"id": 1, "n": 9007199254740993, "ok": True, "s": "x",
                                                     "_sdc_sequence": 1}]),
                                  upto_seq=1, run_id="r1", fence=1, upsert=True, lines=[1]))
        spec = _spec(d, v2, stream="wide")
        d.write_batch(spec, Batch(rows=_rows(spec, [{"id": 2, "n": "two", "ok": "maybe", "s": [1, 2],
                                                     "_sdc_sequence": 2}]),
                                  upto_seq=2, run_id="r1", fence=1, upsert=True, lines=[2]))
    finally:
        d.close()
    cols = bq.columns("wide")
    assert (cols["n"], cols["ok"], cols["s"]) == (base.STRING, base.STRING, base.JSON)
    rows = {r["id"]: r for r in bq.rows("wide")}
    assert (rows[1]["n"], rows[1]["ok"], rows[1]["s"]) == ("9007199254740993", "true", "x")
    assert (rows[2]["n"], rows[2]["ok"], rows[2]["s"]) == ("two", "maybe", [1, 2])
