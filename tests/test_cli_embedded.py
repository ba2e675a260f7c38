"""The embedded mode through the real CLI: loads checked row by row, settings, and every class of bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import time

import duckdb
import orjson
import pytest

from .conftest import BIN, ROOT, generate
from .expected import assert_same_rows, duckdb_rows, expected_rows, model


def _config(tmp_path, **extra) -> str:
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"duckdb_path": str(tmp_path / "out.duckdb"), **extra}))
    return str(path)


def _check(tmp_path, data: bytes) -> None:
    for name, stream in model(data).items():
        assert_same_rows(duckdb_rows(str(tmp_path / "out.duckdb"), name, stream), expected_rows(stream),
                         stream["keys"], name)


def _sql(tmp_path, query: str):
    con = duckdb.connect(str(tmp_path / "out.duckdb"), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def _lines(*msgs) -> bytes:
    return b"".join(orjson.dumps(m) + b"\n" for m in msgs)


SCHEMA = {"type": "SCHEMA", "stream": "s", "key_properties": ["id"],
          "schema": {"properties": {"id": {"type": "integer"}, "v": {"type": ["null", "string"]}}}}


def test_generated_input_loads_exactly_with_states_in_order(cli, tmp_path):
    data = generate(20000)
    result = cli(["--config", _config(tmp_path, batch_size_rows=3000)], input_bytes=data, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    input_states = [orjson.loads(line)["value"] for line in data.splitlines() if b'"STATE"' in line]
    positions = [input_states.index(s) for s in result.states]
    assert positions == sorted(positions) and result.states[-1] == input_states[-1]
    _check(tmp_path, data)
    assert _sql(tmp_path, "SELECT count(referrer) > 0 FROM users") == [(True,)]
    summary = result.stderr.strip().splitlines()[-1]
    assert "users: " in summary and "events: " in summary


def test_state_output_value_prints_bare_state_values_for_a_taps_state_file(cli, tmp_path):
    data = generate(12000)
    result = cli(["--config", _config(tmp_path, batch_size_rows=3000, state_output="value")], input_bytes=data)
    assert result.returncode == 0, result.stderr
    printed = [orjson.loads(line) for line in result.stdout.splitlines()]
    input_states = [orjson.loads(line)["value"] for line in data.splitlines() if b'"STATE"' in line]
    assert printed and all(p in input_states for p in printed)
    assert printed[-1] == input_states[-1]  # `tail -1` of stdout is the tap's next --state file


def test_stdin_and_example_file(tmp_path):
    example = (ROOT / "examples" / "shop.singer").read_bytes()
    proc = subprocess.run(f"cat {ROOT / 'examples' / 'shop.singer'} | {BIN / 'singer-ingest'} --config "
                          f"{_config(tmp_path)}", shell=True, capture_output=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert orjson.loads(proc.stdout.splitlines()[-1])["value"] == model(example)["orders"]["last_state"]
    _check(tmp_path, example)
    types = dict(_sql(tmp_path, "SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name = 'orders'"))
    assert types["ordered_at"] == "TIMESTAMP WITH TIME ZONE" and types["lines"] == "JSON"
    assert _sql(tmp_path, "SELECT total FROM orders WHERE total = 19.99 LIMIT 1") in ([(19.99,)], [])


def test_default_path_in_the_working_directory(cli, tmp_path):
    result = cli(["--input", str(ROOT / "examples" / "shop.singer")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "singer_ingest.duckdb").exists()


def test_age_flush_prints_state_while_the_tap_is_quiet(tmp_path):
    proc = subprocess.Popen([str(BIN / "singer-ingest"), "--config", _config(tmp_path, max_record_age_seconds=1)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdin.write(_lines(SCHEMA, {"type": "RECORD", "stream": "s", "record": {"id": 1}},
                            {"type": "STATE", "value": {"b": 1}}))
    proc.stdin.flush()
    start = time.monotonic()
    assert orjson.loads(proc.stdout.readline()) == {"type": "STATE", "value": {"b": 1}}
    assert time.monotonic() - start < 15
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize("method, hard, expected", [
    ("upsert", False, [(1, "v2", False), (2, "old", True), (3, "v2", False)]),
    ("upsert", True, [(1, "v2", False), (3, "v2", False)]),
    ("append-only", False, [(1, "old", True), (1, "v2", False), (2, "old", True), (3, "v2", False)]),
])
def test_load_methods_and_activate_version(cli, tmp_path, method, hard, expected):
    rec = lambda i, v, ver: {"type": "RECORD", "stream": "s", "record": {"id": i, "v": v}, "version": ver}
    data = _lines(SCHEMA, rec(1, "old", 1), rec(2, "old", 1), {"type": "ACTIVATE_VERSION", "stream": "s", "version": 2},
                  rec(1, "v2", 2), rec(3, "v2", 2), {"type": "ACTIVATE_VERSION", "stream": "s", "version": 2})
    result = cli(["--config", _config(tmp_path, load_method=method, hard_delete=hard)], input_bytes=data)
    assert result.returncode == 0, result.stderr
    assert _sql(tmp_path, "SELECT id, v, _sdc_deleted_at IS NOT NULL FROM s ORDER BY id, v") == expected


def test_overwrite_replaces_the_table_and_metadata_can_be_off(cli, tmp_path):
    conf = _config(tmp_path, load_method="overwrite", add_record_metadata=False)
    for ids in ((1, 2, 3), (7,)):
        data = _lines(SCHEMA, *({"type": "RECORD", "stream": "s", "record": {"id": i}} for i in ids))
        assert cli(["--config", conf], input_bytes=data).returncode == 0
    assert _sql(tmp_path, "SELECT id FROM s") == [(7,)]
    cols = [r[0] for r in _sql(tmp_path, "SELECT column_name FROM information_schema.columns WHERE table_name = 's'")]
    assert cols == ["id", "v"]


def test_batch_message_with_gzip_files(cli, tmp_path):
    path = tmp_path / "part-1.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b'{"id": 1, "v": "a"}\n{"id": 2, "v": "b"}\n{"id": 1, "v": "c"}\n')
    data = _lines(SCHEMA, {"type": "BATCH", "stream": "s", "encoding": {"format": "jsonl", "compression": "gzip"},
                           "manifest": [f"file://{path}"]}, {"type": "STATE", "value": {"done": True}})
    result = cli(["--config", _config(tmp_path)], input_bytes=data)
    assert result.returncode == 0, result.stderr
    assert result.states == [{"done": True}]
    assert _sql(tmp_path, "SELECT id, v FROM s ORDER BY id") == [(1, "c"), (2, "b")]


def test_config_errors_and_env_overrides(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"batch_size_rowz": 5}')
    result = cli(["--config", str(bad)], input_bytes=b"")
    assert result.returncode == 2 and "batch_size_rowz" in result.stderr.strip().splitlines()[-1]
    data = _lines(SCHEMA, *({"type": "RECORD", "stream": "s", "record": {"id": i}} for i in range(50)))
    result = cli(["--config", _config(tmp_path)], input_bytes=data, env={"SINGER_INGEST_BATCH_SIZE_ROWS": "7"})
    assert result.returncode == 0, result.stderr
    assert _sql(tmp_path, "SELECT count(*), count(DISTINCT _sdc_batched_at) >= 7 FROM s") == [(50, True)]


# -- bad input: one clear line, non-zero exit, nothing from after the bad line -------------------------
GOOD_HEAD = [SCHEMA, {"type": "RECORD", "stream": "s", "record": {"id": 1}}, {"type": "STATE", "value": {"at": 1}}]
GOOD_TAIL = [{"type": "RECORD", "stream": "s", "record": {"id": 99}}, {"type": "STATE", "value": {"at": 2}}]


@pytest.mark.parametrize("bad, what, stream", [
    (b'{"type": "RECORD", "stream": "s", "record": {"id": 2}', "malformed JSON", None),
    (b'{"type":"RECORD","stream":"s","record":{"id":2},}', "malformed JSON", None),
    (b'{"type": "RECORD", "stream": "s", "stream": "t", "record": {"id": 2}}', "names stream 't' after", "s"),
    (b'{"type": "SOMETHING", "stream": "s"}', "unknown message type", "s"),
    (b'{"type": "RECORD", "stream": "s"}', 'no "record"', "s"),
    (b'{"type": "SCHEMA", "stream": "t"}', 'no "schema"', "t"),
    (b'{"type": "STATE"}', 'no "value"', None),
    (b'{"stream": "s", "record": {}}', 'no "type"', None),
    (b'{"type": "RECORD", "stream": "other", "record": {"id": 2}}', "RECORD before any SCHEMA", "other"),
    (b'{"type": "RECORD", "stream": "s", "record": {"id": "two"}}', "fails its JSON schema", "s"),
    (b'{"type": "RECORD", "stream": "s", "record": {"id": 2, "v": "\xc3\x28"}}', "invalid UTF-8", None),
    (b'{"type": "RECORD", "stream": "s", "record": {"id": 2, "v": "' + b"x" * 5000 + b'"}}', "max_line_bytes", None),
])
def test_bad_input(cli, tmp_path, bad, what, stream):
    data = _lines(*GOOD_HEAD) + bad + b"\n" + _lines(*GOOD_TAIL)
    result = cli(["--config", _config(tmp_path, max_line_bytes=4000)], input_bytes=data)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("singer-ingest: error: input line 4") and what in last, last
    if stream:
        assert repr(stream) in last, last
    assert "Traceback" not in result.stderr
    assert result.states in ([], [{"at": 1}])
    if (tmp_path / "out.duckdb").exists() and _sql(tmp_path, "SELECT count(*) FROM information_schema.tables "
                                                             "WHERE table_name = 's'") == [(1,)]:
        assert _sql(tmp_path, "SELECT count(*) FROM s WHERE id = 99") == [(0,)]


@pytest.mark.parametrize("prop, fmt, bad", [("d", "date", "20240814"), ("d", "date", "2024-W33-3"),
                                             ("t", "date-time", "20240814T101010Z"), ("c", "time", "101010")])
def test_basic_iso_forms_the_databases_refuse_fail_at_the_records_line(cli, tmp_path, prop, fmt, bad):
    schema = {"properties": {"id": {"type": "integer"}, prop: {"type": ["null", "string"], "format": fmt}}}
    data = _lines({"type": "SCHEMA", "stream": "s", "schema": schema, "key_properties": ["id"]},
                  {"type": "RECORD", "stream": "s", "record": {"id": 1, prop: None}},
                  {"type": "RECORD", "stream": "s", "record": {"id": 2, prop: bad}})
    result = cli(["--config", _config(tmp_path)], input_bytes=data)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("singer-ingest: error: input line 3, stream 's': record fails its JSON schema"), last


def test_unknown_types_can_be_skipped(cli, tmp_path):
    data = _lines(*GOOD_HEAD) + b'{"type": "SOMETHING"}\n' + _lines(*GOOD_TAIL)
    result = cli(["--config", _config(tmp_path, allow_unknown_message_types=True)], input_bytes=data)
    assert result.returncode == 0 and result.states[-1] == {"at": 2}


def test_bad_record_deep_in_a_large_input(cli, tmp_path):
    lines = generate(20000).splitlines()
    n = next(i for i in range(15000, len(lines)) if b'"stream":"orders"' in lines[i] and b'"RECORD"' in lines[i])
    msg = orjson.loads(lines[n])
    msg["record"]["amount"] = "lots"
    lines[n] = orjson.dumps(msg)
    result = cli(["--config", _config(tmp_path)], input_bytes=b"\n".join(lines) + b"\n")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert f"input line {n + 1}, stream 'orders'" in last, last
    input_states = {bytes(lines[i]): i for i in range(n) if b'"STATE"' in lines[i]}
    for state in result.states:
        assert orjson.dumps({"type": "STATE", "value": state}) in {orjson.dumps(orjson.loads(s)) for s in input_states}


def test_version_about_and_the_readme_table_agree(cli):
    version = cli(["--version"])
    assert version.returncode == 0 and version.stdout.decode().startswith("singer-ingest ")
    info = orjson.loads(cli(["--about"]).stdout)
    from ingest.config import SETTINGS

    assert [s["name"] for s in info["settings"]] == [s.name for s in SETTINGS]
    assert info["settings"][0]["env"] == "SINGER_INGEST_DESTINATION"
    markdown = cli(["--about", "--format", "markdown"]).stdout.decode()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(table) in readme, "README's configuration table differs from --about --format markdown"


# -- schemas and record properties ---------------------------------------------------------------------

def test_a_schema_without_properties_fails_at_its_line_with_no_state_from_there_on(cli, tmp_path):
    data = _lines(SCHEMA, {"type": "RECORD", "stream": "s", "record": {"id": 1}}, {"type": "STATE", "value": {"at": 1}},
                  {"type": "SCHEMA", "stream": "t", "schema": {"type": "object"}, "key_properties": []},
                  {"type": "RECORD", "stream": "t", "record": {"a": 1, "b": "x"}},
                  {"type": "RECORD", "stream": "s", "record": {"id": 2}}, {"type": "STATE", "value": {"at": 2}})
    result = cli(["--config", _config(tmp_path)], input_bytes=data)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("singer-ingest: error: input line 4, stream 't': SCHEMA has no \"properties\""), last
    assert "Declare the stream's fields under \"properties\"" in last
    assert "Traceback" not in result.stderr
    assert result.states in ([], [{"at": 1}])
    if (tmp_path / "out.duckdb").exists():
        assert _sql(tmp_path, "SELECT count(*) FROM information_schema.tables WHERE table_name = 't'") == [(0,)]


def test_a_nested_object_without_properties_loads_whole(cli, tmp_path):
    data = _lines({"type": "SCHEMA", "stream": "s", "key_properties": ["id"],
                   "schema": {"properties": {"id": {"type": "integer"}, "o": {"type": "object"}}}},
                  {"type": "RECORD", "stream": "s", "record": {"id": 1, "o": {"a": 1, "b": [True, "x"]}}})
    result = cli(["--config", _config(tmp_path)], input_bytes=data)
    assert result.returncode == 0, result.stderr
    assert [(i, orjson.loads(o)) for i, o in _sql(tmp_path, "SELECT id, o FROM s")] == [(1, {"a": 1, "b": [True, "x"]})]
    assert "not declared" not in result.stderr


def _with_undeclared(records: int) -> tuple[bytes, int, int]:
    """Generated input whose `events` records carry properties their schema does not declare: every fourth one
    `zz_extra`, one of them `yy` too. Returns the input, the number of such records and the line of the first."""
    lines = generate(records).splitlines()
    n, first, seen = 0, None, 0
    for i, raw in enumerate(lines):
        if b'"stream":"events"' in raw and b'"RECORD"' in raw:
            seen += 1
            if seen % 4 == 0:
                msg = orjson.loads(raw)
                msg["record"]["zz_extra"] = seen
                if seen == 400:
                    msg["record"]["yy"] = None
                lines[i] = orjson.dumps(msg)
                n += 1
                first = first or i + 1
    return b"\n".join(lines) + b"\n", n, first


def test_undeclared_properties_are_left_out_warned_once_and_counted_in_the_summary(cli, tmp_path):
    data, n, first = _with_undeclared(8000)
    result = cli(["--config", _config(tmp_path, batch_size_rows=1000)], input_bytes=data)
    assert result.returncode == 0, result.stderr
    _check(tmp_path, data)  # every declared value loaded, rows exactly the input's
    assert result.stderr.count("property 'zz_extra' is not declared") == 1
    assert f"stream 'events': input line {first}: property 'zz_extra' is not declared" in result.stderr
    assert result.stderr.count("property 'yy' is not declared") == 1
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.endswith(f"not loaded: events: {n} (properties zz_extra, yy)"), summary
    cols = [r[0] for r in _sql(tmp_path, "SELECT column_name FROM information_schema.columns "
                                         "WHERE table_name = 'events'")]
    assert "zz_extra" not in cols and "yy" not in cols
    # The summary as JSON carries the counts too.
    (tmp_path / "out.duckdb").unlink()
    as_json = cli(["--config", _config(tmp_path, batch_size_rows=1000), "--log-format", "json"], input_bytes=data)
    last = orjson.loads(as_json.stderr.strip().splitlines()[-1])
    assert last["records_with_undeclared_properties"] == {"events": n}
    assert last["undeclared_properties"] == {"events": ["zz_extra", "yy"]}


def test_undeclared_properties_set_to_error_fail_the_run_at_the_line(cli, tmp_path):
    data, n, first = _with_undeclared(8000)
    result = cli(["--config", _config(tmp_path, batch_size_rows=500, undeclared_properties="error")],
                 input_bytes=data)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"singer-ingest: error: input line {first}, stream 'events': record has properties its "
                           f"schema does not declare: 'zz_extra'"), last
    assert "set undeclared_properties to warn" in last and "Traceback" not in result.stderr
    lines = data.splitlines()
    before = [orjson.loads(lines[i])["value"] for i in range(first - 1) if b'"STATE"' in lines[i]]
    assert all(s in before for s in result.states)


def test_undeclared_properties_takes_warn_or_error_only(cli, tmp_path):
    result = cli(["--config", _config(tmp_path, undeclared_properties="ignore")], input_bytes=_lines(SCHEMA))
    assert result.returncode == 2
    assert "setting 'undeclared_properties'" in result.stderr and "must be one of warn, error" in result.stderr


# -- the command line ------------------------------------------------------------------------------------

def test_help_shows_every_option_and_subcommand_with_its_help(cli):
    from ingest.cli import SUBCOMMANDS, _parser, _state_parser, _status_parser

    for args, parser in ((["--help"], _parser()), (["state", "--help"], _state_parser()),
                         (["status", "--help"], _status_parser())):
        result = cli(args)
        assert result.returncode == 0, result.stderr
        text = result.stdout.decode()
        for action in parser._actions:
            assert action.help, f"{action.option_strings or action.dest} of {args} has no help"
            for option in action.option_strings:
                assert option in text, (args, option)
    text = cli(["--help"]).stdout.decode()
    for name, help_text in SUBCOMMANDS.items():
        assert f"  {name:8s} {help_text}" in text
    assert "without a subcommand, singer-ingest loads tap output" in text


@pytest.mark.parametrize("args, message", [
    (["bogus"], "'bogus' is not a subcommand; the subcommands are state, status"),
    (["--input", "x.singer", "bogus"], "'bogus' is not a subcommand; the subcommands are state, status"),
    (["--config", "x.json", "status"], "a subcommand goes first, before any option: singer-ingest status"),
    (["--format", "markdown"], "--format applies to --about only"),
])
def test_command_line_mistakes_are_usage_errors_that_load_nothing(cli, tmp_path, args, message):
    result = cli(args, input_bytes=_lines(SCHEMA, {"type": "RECORD", "stream": "s", "record": {"id": 1}}),
                 cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("singer-ingest: error: ") and message in last, result.stderr
    assert result.stderr.startswith("usage: singer-ingest [options]")
    assert result.stdout == b"" and not list(tmp_path.glob("*.duckdb"))


def test_format_goes_with_about(cli):
    markdown = cli(["--about", "--format", "markdown"])
    assert markdown.returncode == 0 and markdown.stdout.startswith(b"#")
    assert orjson.loads(cli(["--about", "--format", "json"]).stdout) == orjson.loads(cli(["--about"]).stdout)


def test_dead_letters_counted_in_the_json_summary_and_malformed_lines_still_fail(cli, tmp_path):
    from .test_conformance import with_bad_events

    data, good, bad = with_bad_events(generate(6000), every=13)
    result = cli(["--config", _config(tmp_path, batch_size_rows=700, bad_records="dead_letter"), "--log-format",
                  "json"], input_bytes=data)
    assert result.returncode == 0, result.stderr
    _check(tmp_path, good)
    assert orjson.loads(result.stderr.strip().splitlines()[-1])["dead_letters"] == {"events": len(bad)}
    assert [r[0] for r in _sql(tmp_path, "SELECT line FROM _singer_ingest_dead_letter ORDER BY line")] == bad
    # A line that is not JSON, or has no type, belongs to no stream: it fails the run, dead letters or not.
    for broken in (b"{not json\n", b'{"stream": "s", "record": {"id": 1}}\n'):
        (tmp_path / "out.duckdb").unlink()
        result = cli(["--config", _config(tmp_path, bad_records="dead_letter")],
                     input_bytes=_lines(SCHEMA, {"type": "RECORD", "stream": "s", "record": {"id": 1}}) + broken)
        assert result.returncode == 1 and "input line 3" in result.stderr.strip().splitlines()[-1], result.stderr
