"""The DuckDB sink's dead letters: committed with the rows and the offset, once, also without rows; none from a
refused or fenced batch; several threads creating the dead-letter table at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ingest.errors import DestinationError
from sinks import base
from sinks.duckdb.destination import DuckDBDestination

from .sink_helpers import FAILED_AT, batch, dead_letter, dead_letter_key, row, spec_for


@pytest.fixture(params=["embedded", "shared-file"])
def dest(request, tmp_path):
    d = DuckDBDestination(str(tmp_path / "d.duckdb"), shared_file=request.param == "shared-file")
    yield d
    d.close()


def query(d: DuckDBDestination, q: str) -> list[tuple]:
    with d._connection() as con:
        return con.execute(q).fetchall()


def dead_letters_in(d: DuckDBDestination) -> list[tuple]:
    return query(d, f"SELECT stream, line, _sdc_sequence, run_id, reason, error, record, "
                    f"strftime(failed_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%f+00:00') "
                    f"FROM {d._q(base.DEAD_LETTER_TABLE)} ORDER BY stream, line")


def offset_of(d: DuckDBDestination, stream: str = "items") -> int:
    return query(d, f"SELECT seq FROM {d._q('_singer_ingest_offsets')} WHERE stream = '{stream}'")[0][0]


def test_dead_letters_commit_with_the_rows_once_also_without_rows(dest, caplog):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    letters = [dead_letter(2), dead_letter(4, reason="destination")]
    dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], dead_letters=letters))
    assert dead_letters_in(dest) == letters
    assert dead_letters_in(dest)[0][7] == FAILED_AT
    # The same batch again (its commit's acknowledgement was lost): neither rows nor dead letters twice.
    dest.write_batch(spec, batch([row(spec, id=1), row(spec, id=3)], upto=4, lines=[1, 3], dead_letters=letters))
    assert "acknowledgement was lost" in caplog.text
    # A batch of dead letters only commits them with the offset, once.
    for _ in range(2):
        dest.write_batch(spec, batch([], upto=6, dead_letters=[dead_letter(5), dead_letter(6)]))
    assert [r[1] for r in dead_letters_in(dest)] == [2, 4, 5, 6]
    assert query(dest, f"SELECT id FROM {dest._q('items')} ORDER BY id") == [(1,), (3,)]
    assert offset_of(dest) == 6


def test_a_refused_batch_writes_no_dead_letters(dest):
    spec = spec_for(dest)
    dest.claim_stream("r1", "items", 1)
    with pytest.raises(DestinationError) as info:  # a value DuckDB refuses fails the batch, dead letters included
        dest.write_batch(spec, batch([row(spec, id=1, at="not a time")], upto=3, lines=[3],
                                     dead_letters=[dead_letter(2)]))
    assert not info.value.transient
    assert dead_letters_in(dest) == [] and query(dest, f"SELECT count(*) FROM {dest._q('items')}") == [(0,)]



def test_drain_threads_creating_the_dead_letter_table_at_once_meet_on_it(dest):
    specs = [spec_for(dest, stream=f"s{n}") for n in range(4)]
    for n in range(4):
        dest.claim_stream("r1", f"s{n}", 1)
    start = threading.Barrier(4)

    def write(n):
        start.wait()
        dest.write_batch(specs[n], batch([row(specs[n], id=n)], upto=2, lines=[1],
                                         dead_letters=[dead_letter(2, stream=f"s{n}")]))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    assert [dead_letter_key(r) for r in dead_letters_in(dest)] == \
        [dead_letter_key(dead_letter(2, stream=f"s{n}")) for n in range(4)]
    assert query(dest, f"SELECT count(*) FROM information_schema.tables WHERE table_name = "
                       f"'{base.DEAD_LETTER_TABLE}'") == [(1,)]
