"""The Delta Lake sink, on a local folder and on S3 (a local moto server): values read back row by row, a
concurrent commit of another writer retried and never overwritten, a stale owner fenced out (also when it read
its snapshot before the takeover, and when the stream was claimed before its table existed), a retry after a
lost acknowledgement that writes nothing, schema evolution keeping the table's offsets, the maintenance
commands, and a whole run through the CLI."""

from __future__ import annotations

import logging
import uuid
from datetime import date, datetime, timezone

import orjson
import pytest
from deltalake import DeltaTable, write_deltalake

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, Fenced
from sinks import base
from sinks.delta import destination as delta
from sinks.delta.destination import DeltaDestination, app_id, open_destination

from . import expected, s3server
from .conftest import generate
from .sink_helpers import FAILED_AT, SCHEMA, batch, dead_letter, dead_letter_key, row, spec_for

pytestmark = [pytest.mark.delta]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    return s3server.endpoint()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def where(request, tmp_path) -> tuple[str, dict]:
    """(delta_uri, worker settings) of a fresh place for tables."""
    if request.param == "local":
        return str(tmp_path / "lake"), {}
    request.getfixturevalue("s3_endpoint")
    return f"s3://{s3server.BUCKET}/sink-{uuid.uuid4().hex[:10]}", s3server.connection()


@pytest.fixture()
def lake(where):
    uri, connection = where
    d = open_destination(RunSettings(destination="delta", destination_settings={"delta_uri": uri}),
                         ConnectionSettings(destination_settings=connection), embedded=False)
    yield d
    d.close()


def table(d: DeltaDestination, name: str = "items") -> DeltaTable:
    return DeltaTable(d.uri(name), storage_options=d.options or None)


def rows_of(d: DeltaDestination, name: str = "items") -> list[dict]:
    return sorted(table(d, name).to_pyarrow_table().to_pylist(), key=lambda r: r["id"])


def test_values_read_back_row_by_row(lake):
    spec = spec_for(lake, metadata=True)
    lake.claim_stream("r1", "items", 1)
    at = "2024-02-29T23:59:59.123456+02:00"
    lake.write_batch(spec, batch([
        row(spec, 1, id=1, price=19.99, name="Zürich 日本語 'q\" \\ \t\n", ok=True, at=at, day="2024-02-29",
            clock="12:34:56.5", doc={"a": [1, "b", None], "n": {"x": 1.5}}, tags=["t1", 2]),
        row(spec, 2, id=2),
    ], upto=2))
    r1, r2 = rows_of(lake)
    assert r1["price"] == 19.99 and r1["name"] == "Zürich 日本語 'q\" \\ \t\n" and r1["ok"] is True
    assert r1["at"] == datetime(2024, 2, 29, 21, 59, 59, 123456, tzinfo=timezone.utc)
    assert r1["day"] == date(2024, 2, 29) and r1["clock"] == "12:34:56.5"
    assert orjson.loads(r1["doc"]) == {"a": [1, "b", None], "n": {"x": 1.5}} and orjson.loads(r1["tags"]) == ["t1", 2]
    assert r1["_sdc_sequence"] == 1
    assert all(r2[c] is None for c in ("price", "name", "ok", "at", "day", "clock", "doc", "tags"))
    logical = {f.name: f.metadata[delta.LOGICAL_KEY] for f in table(lake).schema().fields}
    assert (logical["doc"], logical["name"], logical["clock"], logical["at"]) == \
        (base.JSON, base.STRING, base.TIME, base.TIMESTAMP)


def test_offset_and_fence_travel_in_the_rows_commit(lake):
    spec = spec_for(lake, keys=())
    lake.claim_stream("r1", "items", 3)
    lake.write_batch(spec, batch([row(spec, id=1)], upto=7, fence=3, upsert=False))
    t = table(lake)
    assert t.transaction_version(app_id("r1", "items")) == 7
    assert t.transaction_version(app_id("r1", "items") + delta.FENCE_SUFFIX) == 3
    last = t.history(1)[0]
    assert last["operation"] == "WRITE" and last["singer_ingest.offset"] == "7" and last["singer_ingest.fence"] == "3"
    assert lake.claim_stream("r1", "items", 4) == 7


def test_a_retry_after_a_lost_acknowledgement_writes_nothing(lake, caplog):
    spec = spec_for(lake, keys=())
    lake.claim_stream("r1", "items", 1)
    b = batch([row(spec, id=1), row(spec, id=2)], upto=2, upsert=False)
    lake.write_batch(spec, b)
    version = table(lake).version()
    caplog.set_level(logging.WARNING)
    lake.write_batch(spec, b)  # the commit went through, its answer did not: the worker writes it again
    assert table(lake).version() == version
    assert "acknowledgement was lost" in caplog.text
    assert [r["id"] for r in rows_of(lake)] == [1, 2]


def _stale_once(monkeypatch, d: DeltaDestination, name: str, meanwhile):
    """The next load of table ``name`` returns its snapshot as it was before ``meanwhile()`` committed: the commit
    that follows races ``meanwhile``'s commit."""
    real = DeltaDestination._load
    done = []

    def load(self, t):
        dt = real(self, t)
        if t == name and not done and dt is not None:
            done.append(True)
            meanwhile()
        return dt

    monkeypatch.setattr(DeltaDestination, "_load", load)
    return done


@pytest.mark.parametrize("keys", [(), ("id",)])
def test_a_concurrent_commit_of_another_writer_is_retried_not_overwritten(lake, monkeypatch, keys, caplog):
    caplog.set_level(logging.WARNING)
    spec = spec_for(lake, keys=keys, metadata=True)
    lake.claim_stream("r1", "items", 1)
    lake.write_batch(spec, batch([row(spec, 1, id=1, name="a")], upto=1, upsert=bool(keys)))
    other = table(lake).to_pyarrow_table().slice(0, 0)
    import pyarrow as pa

    theirs = pa.Table.from_pylist([{c: None for c in other.column_names} | {"id": 100, "name": "theirs"}],
                                  schema=other.schema)

    def another_writer():
        write_deltalake(table(lake), theirs, mode="append")

    raced = _stale_once(monkeypatch, lake, "items", another_writer)
    lake.write_batch(spec, batch([row(spec, 2, id=1, name="ours"), row(spec, 3, id=2, name="b")], upto=3,
                                 upsert=bool(keys)))
    assert raced
    got = sorted((r["id"], r["name"]) for r in rows_of(lake))
    if keys:
        # the merge read the files the other writer's commit changed the set of: a conflict, retried
        assert "Delta commit conflict" in caplog.text
        assert got == [(1, "ours"), (2, "b"), (100, "theirs")]
    else:
        assert got == [(1, "a"), (1, "ours"), (2, "b"), (100, "theirs")]
    assert table(lake).transaction_version(app_id("r1", "items")) == 3


def test_a_stale_owner_is_fenced_out_also_when_it_read_before_the_takeover(lake, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    spec = spec_for(lake)
    assert lake.claim_stream("r1", "items", 1) == 0
    lake.write_batch(spec, batch([row(spec, id=1, name="a")], upto=1, fence=1))
    # The stale owner reads its snapshot, then the new owner's claim commits, then the stale owner commits:
    # the two commits carry the same application id, so the stale one conflicts, re-reads, and is refused.
    new_owner = DeltaDestination(lake.root, None, lake.options)
    raced = _stale_once(monkeypatch, lake, "items", lambda: new_owner.claim_stream("r1", "items", 2))
    with pytest.raises(Fenced):
        lake.write_batch(spec, batch([row(spec, id=2, name="stale")], upto=2, fence=1))
    assert raced and "Delta commit conflict" in caplog.text
    monkeypatch.undo()
    with pytest.raises(Fenced):
        lake.activate_version(spec, 5, run_id="r1", upto_seq=3, fence=1, hard_delete=True,
                              deleted_at="2024-01-01T00:00:00+00:00")
    with pytest.raises(Fenced):
        lake.claim_stream("r1", "items", 1)
    new_owner.write_batch(spec, batch([row(spec, id=2, name="owner")], upto=2, fence=2))
    assert [(r["id"], r["name"]) for r in rows_of(lake)] == [(1, "a"), (2, "owner")]
    assert table(lake).transaction_version(app_id("r1", "items")) == 2


def test_a_claim_before_the_table_exists_fences_the_first_commit(lake):
    """Streams are claimed before their SCHEMA: the claim goes to the claims table, and the first commit to the
    stream's table reads it."""
    assert lake.claim_stream("r1", "items", 1) == 0
    assert lake.claim_stream("r1", "items", 2) == 0  # a takeover before any SCHEMA
    with pytest.raises(Fenced):
        lake.claim_stream("r1", "items", 1)
    spec = spec_for(lake)
    with pytest.raises(Fenced):
        lake.write_batch(spec, batch([row(spec, id=1, name="stale")], upto=1, fence=1))
    lake.write_batch(spec, batch([row(spec, id=1, name="owner")], upto=1, fence=2))
    assert [(r["id"], r["name"]) for r in rows_of(lake)] == [(1, "owner")]
    claims = DeltaTable(lake.uri(delta.CLAIMS_TABLE), storage_options=lake.options or None)
    assert sorted(r["fence"] for r in claims.to_pyarrow_table().to_pylist()) == [1, 2]


def test_two_workers_creating_one_table_meet_on_it(lake, monkeypatch):
    other = DeltaDestination(lake.root, None, lake.options)
    real = DeltaDestination._load
    raced = []

    def load(self, name):
        if self is lake and name == "items" and not raced:  # looked before the other worker created it
            raced.append(True)
            spec_for(other)
            return None
        return real(self, name)

    monkeypatch.setattr(DeltaDestination, "_load", load)
    spec = spec_for(lake)
    assert raced and spec.column_names == ("id", "price", "name", "ok", "at", "day", "clock", "doc", "tags")
    assert table(lake).version() == 0


def test_schema_evolution_rewrites_a_widened_column_and_keeps_the_offsets(lake):
    v1 = {"properties": {"id": {"type": "integer"}, "n": {"type": ["null", "integer"]}, "s": {"type": "string"}}}
    v2 = {"properties": {"id": {"type": "integer"}, "n": {"type": ["null", "number"]},
                         "s": {"type": ["null", "string", "object"]}, "c": {"type": ["null", "boolean"]}}}
    spec = spec_for(lake, schema=v1)
    lake.claim_stream("r1", "items", 1)
    lake.write_batch(spec, batch([row(spec, id=1, n=2**53 + 1, s="x"), row(spec, id=2, n=None, s="y")], upto=2))
    spec2 = spec_for(lake, schema=v2)
    assert [(c.name, c.type) for c in spec2.columns] == [("id", base.INTEGER), ("n", base.NUMBER), ("s", base.JSON),
                                                         ("c", base.BOOLEAN)]
    lake.write_batch(spec2, batch([row(spec2, id=3, n=1.5, s={"a": 1}, c=True)], upto=3))
    got = rows_of(lake)
    assert [(r["n"], r["s"], r["c"]) for r in got] == [(float(2**53), '"x"', None), (None, '"y"', None),
                                                       (1.5, '{"a":1}', True)]
    assert table(lake).transaction_version(app_id("r1", "items")) == 3
    assert lake.claim_stream("r1", "items", 2) == 3


def test_activate_version_on_an_empty_table_commits_the_offset(lake):
    spec = spec_for(lake, metadata=True)
    lake.claim_stream("r1", "items", 1)
    lake.activate_version(spec, 1, run_id="r1", upto_seq=4, fence=1, hard_delete=False,
                          deleted_at="2024-01-01T00:00:00Z")
    assert table(lake).transaction_version(app_id("r1", "items")) == 4


def test_unsafe_rename_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    with pytest.raises(ConfigError, match="AWS_S3_ALLOW_UNSAFE_RENAME"):
        open_destination(RunSettings(destination="delta", destination_settings={"delta_uri": str(tmp_path)}),
                         ConnectionSettings(), embedded=False)


def test_secrets_stay_out_of_errors_and_logs(s3_endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    settings = {**s3server.connection(), "delta_s3_secret_access_key": "s3cr3t-value-never-shown",
                "delta_s3_access_key_id": "wrong-key"}
    d = open_destination(RunSettings(destination="delta",
                                     destination_settings={"delta_uri": f"s3://{s3server.BUCKET}/x"}),
                         ConnectionSettings(destination_settings=settings), embedded=False)
    assert "s3cr3t" not in repr(ConnectionSettings(destination_settings=settings))
    spec = spec_for(d, keys=())  # moto accepts any key: this only checks nothing prints the secret
    d.write_batch(spec, batch([row(spec, id=1)], upto=1, upsert=False))
    assert "s3cr3t" not in caplog.text


@pytest.mark.integration
def test_a_run_through_the_cli_on_s3_then_optimize_and_vacuum(cli, s3_endpoint, tmp_path):
    data = generate(3000)
    (tmp_path / "in.singer").write_bytes(data)
    uri = f"s3://{s3server.BUCKET}/cli-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "target.json"
    config.write_text(orjson.dumps({"destination": "delta", "delta_uri": uri, "batch_size_rows": 500,
                                    **s3server.connection()}).decode())
    result = cli(["--config", str(config), "--input", str(tmp_path / "in.singer")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    opts = delta.storage_options(ConnectionSettings(destination_settings=s3server.connection()))
    for stream, m in expected.model(data).items():
        assert DeltaTable(f"{uri}/{stream}", storage_options=opts).count() == len(m["rows"]), stream
    result = cli(["delta", "optimize", "--config", str(config)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "users" in result.stdout.decode()
    result = cli(["delta", "vacuum", "--config", str(config), "--retention-hours", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for stream, m in expected.model(data).items():
        assert DeltaTable(f"{uri}/{stream}", storage_options=opts).count() == len(m["rows"]), stream


@pytest.mark.integration
def test_a_relative_delta_uri_means_the_feeders_directory(cli, tmp_path):
    data = b"".join(orjson.dumps(m) + b"\n" for m in [
        {"type": "SCHEMA", "stream": "Items", "schema": SCHEMA, "key_properties": ["id"]},
        {"type": "RECORD", "stream": "Items", "record": {"id": 1, "name": "a"}},
        {"type": "RECORD", "stream": "Items", "record": {"id": 1, "name": "b"}},
        {"type": "STATE", "value": {"at": 3}}])
    (tmp_path / "in.singer").write_bytes(data)
    (tmp_path / "target.json").write_text(orjson.dumps({"destination": "delta", "delta_uri": "lake",
                                                        "default_target_schema": "Raw Data"}).decode())
    result = cli(["--config", "target.json", "--input", "in.singer"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.states == [{"at": 3}]
    t = DeltaTable(str(tmp_path / "lake" / "raw_data" / "items"))
    assert [(r["id"], r["name"]) for r in t.to_pyarrow_table().to_pylist()] == [(1, "b")]


# -- dead letters ------------------------------------------------------------------------------------------
def dead_letters_in(d: DeltaDestination) -> list[tuple]:
    """The dead-letter table's rows (failed_at as ISO text), by stream and line."""
    got = [(r["stream"], r["line"], r["_sdc_sequence"], r["run_id"], r["reason"], r["error"], r["record"],
            r["failed_at"].isoformat()) for r in table(d, base.DEAD_LETTER_TABLE).to_pyarrow_table().to_pylist()]
    return sorted(got, key=lambda r: (r[0], r[1]))


def test_dead_letters_commit_before_the_rows_once_also_without_rows(lake, caplog):
    caplog.set_level(logging.INFO)
    spec = spec_for(lake, keys=())
    lake.claim_stream("r1", "items", 1)
    letters = [dead_letter(2), dead_letter(4, reason="destination")]
    lake.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], upsert=False,
                                 dead_letters=letters))
    assert dead_letters_in(lake) == letters and dead_letters_in(lake)[0][7] == FAILED_AT
    dl = table(lake, base.DEAD_LETTER_TABLE)
    assert dl.transaction_version(app_id("r1", "items")) == 4
    assert dl.history(1)[0]["singer_ingest.offset"] == "4"
    # The same batch again (its commit's acknowledgement was lost): neither rows nor dead letters twice.
    versions = (table(lake).version(), dl.version())
    lake.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], upsert=False,
                                 dead_letters=letters))
    assert (table(lake).version(), table(lake, base.DEAD_LETTER_TABLE).version()) == versions
    assert "acknowledgement was lost" in caplog.text
    # A batch of dead letters only: its dead letters, then the offset alone, once.
    lake.write_batch(spec, batch([], upto=6, upsert=False, dead_letters=[dead_letter(5), dead_letter(6)]))
    versions = (table(lake).version(), table(lake, base.DEAD_LETTER_TABLE).version())
    lake.write_batch(spec, batch([], upto=6, upsert=False, dead_letters=[dead_letter(5), dead_letter(6)]))
    assert (table(lake).version(), table(lake, base.DEAD_LETTER_TABLE).version()) == versions
    assert [r[1] for r in dead_letters_in(lake)] == [2, 4, 5, 6]
    assert [r["id"] for r in rows_of(lake)] == [1, 3]
    assert table(lake).transaction_version(app_id("r1", "items")) == 6
    assert table(lake, base.DEAD_LETTER_TABLE).transaction_version(app_id("r1", "items")) == 6


@pytest.mark.parametrize("failure", ["crash", "transient"])
@pytest.mark.parametrize("keys", [(), ("id",)])
def test_a_failure_between_the_dead_letters_commit_and_the_rows_commit(lake, monkeypatch, failure, keys, caplog):
    """The dead letters committed, the rows' commit did not (the worker died, or the commit failed and is retried):
    the retry writes the rows alone, so each dead letter and each row is there once."""
    caplog.set_level(logging.INFO)
    spec = spec_for(lake, keys=keys)
    lake.claim_stream("r1", "items", 1)
    failed = []

    def fail_once(what):
        if not failed:
            failed.append(what)
            raise RuntimeError("worker killed") if failure == "crash" else OSError("connection reset by peer")

    real_write, real_merge = delta.write_deltalake, DeltaTable.merge

    def write(target, data, *args, **kwargs):
        if isinstance(target, DeltaTable) and target.table_uri.rstrip("/").endswith("/items"):
            fail_once("rows")
        return real_write(target, data, *args, **kwargs)

    def merge(self, *args, **kwargs):
        fail_once("rows")
        return real_merge(self, *args, **kwargs)

    monkeypatch.setattr(delta, "write_deltalake", write)
    monkeypatch.setattr(DeltaTable, "merge", merge)

    def write_batch():
        lake.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], upsert=bool(keys),
                                     dead_letters=[dead_letter(2), dead_letter(4)]))

    if failure == "crash":
        with pytest.raises(RuntimeError):
            write_batch()
        assert [r[1] for r in dead_letters_in(lake)] == [2, 4] and rows_of(lake) == []
        assert (table(lake).transaction_version(app_id("r1", "items")) or 0) == 0  # the offset did not move
        write_batch()  # the batch is delivered again
    else:
        write_batch()
        assert "retrying" in caplog.text
    assert failed == ["rows"]
    assert "dead letters up to input line 4 were committed by an earlier attempt" in caplog.text
    assert [r[1] for r in dead_letters_in(lake)] == [2, 4]
    assert [r["id"] for r in rows_of(lake)] == [1, 3]
    assert table(lake).transaction_version(app_id("r1", "items")) == 4


def test_a_fenced_owner_writes_no_dead_letters(lake):
    spec = spec_for(lake)
    lake.claim_stream("r1", "items", 1)
    lake.write_batch(spec, batch([row(spec, id=1)], upto=3, lines=[3], dead_letters=[dead_letter(2)]))
    assert lake.claim_stream("r1", "items", 2) == 3  # a new owner takes over
    with pytest.raises(Fenced):
        lake.write_batch(spec, batch([row(spec, id=5)], upto=5, lines=[5], fence=1, dead_letters=[dead_letter(4)]))
    with pytest.raises(Fenced):
        lake.write_batch(spec, batch([], upto=6, fence=1, dead_letters=[dead_letter(6)]))
    assert [r[1] for r in dead_letters_in(lake)] == [2]
    assert table(lake, base.DEAD_LETTER_TABLE).transaction_version(app_id("r1", "items")) == 3


def test_a_stale_owner_racing_the_takeover_leaves_each_dead_letter_once(lake, monkeypatch, caplog):
    """The stale owner read the stream's table before the takeover: its dead letters commit, its rows are refused.
    The new owner cuts its batches otherwise, and writes only the dead letters of lines above those."""
    caplog.set_level(logging.WARNING)
    spec = spec_for(lake, keys=())
    lake.claim_stream("r1", "items", 1)
    new_owner = DeltaDestination(lake.root, None, lake.options)
    raced = _stale_once(monkeypatch, lake, "items", lambda: new_owner.claim_stream("r1", "items", 2))
    with pytest.raises(Fenced):
        lake.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=6, lines=[1, 3], fence=1,
                                     upsert=False, dead_letters=[dead_letter(n) for n in (2, 4, 5, 6)]))
    assert raced and [r[1] for r in dead_letters_in(lake)] == [2, 4, 5, 6] and rows_of(lake) == []
    monkeypatch.undo()
    new_owner.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], fence=2,
                                      upsert=False, dead_letters=[dead_letter(2), dead_letter(4)]))
    new_owner.write_batch(spec, batch([row(spec, id=7)], upto=8, lines=[7], fence=2, upsert=False,
                                      dead_letters=[dead_letter(n) for n in (5, 6, 8)]))
    assert [r[1] for r in dead_letters_in(lake)] == [2, 4, 5, 6, 8]
    assert [r["id"] for r in rows_of(lake)] == [1, 3, 7]
    assert table(lake, base.DEAD_LETTER_TABLE).transaction_version(app_id("r1", "items")) == 8


def test_workers_appending_dead_letters_at_once_each_land_once(lake):
    """Two workers, two drain threads each, write the first dead letters of four streams at the same moment: the
    table is created once, and appends that conflict are retried, never lost or doubled."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    workers = [lake, DeltaDestination(lake.root, None, lake.options)]
    specs = [spec_for(workers[n % 2], stream=f"s{n}", keys=()) for n in range(4)]
    for n in range(4):
        workers[n % 2].claim_stream("r1", f"s{n}", 1)
    start = threading.Barrier(4)

    def write(n):
        start.wait()
        for upto in (3, 6):
            workers[n % 2].write_batch(specs[n], batch([row(specs[n], id=upto)], upto=upto, lines=[upto - 2],
                                                       upsert=False, dead_letters=[
                                                           dead_letter(upto - 1, stream=f"s{n}"),
                                                           dead_letter(upto, stream=f"s{n}")]))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    assert [dead_letter_key(r) for r in dead_letters_in(lake)] == \
        [dead_letter_key(dead_letter(line, stream=f"s{n}")) for n in range(4) for line in (2, 3, 5, 6)]
    assert table(lake, base.DEAD_LETTER_TABLE).history()[-1]["operation"] == "CREATE TABLE"
