"""Mutated tap output: every run ends in a load or in one clear error line, never a traceback, a hang,
or a STATE from past the bad line."""

from __future__ import annotations

import json
import re

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ROOT, run_cli

BASE = (ROOT / "examples" / "shop.singer").read_bytes().splitlines()[:120]

mutation = st.one_of(
    st.tuples(st.just("delete_byte"), st.integers(0, 10**6)),
    st.tuples(st.just("insert_bytes"), st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("drop_line"), st.integers(0, 10**6)),
    st.tuples(st.just("swap_lines"), st.integers(0, 10**6), st.integers(0, 10**6)),
    st.tuples(st.just("retype"), st.integers(0, 10**6), st.sampled_from(["record", "STATE", "Bogus", "SCHEMA", ""])),
    st.tuples(st.just("set_value"), st.integers(0, 10**6),
              st.sampled_from([None, "x", -1, 1.5, [], {}, True, "2024-13-45T99:00:00Z"])),
)


def apply(lines: list[bytes], m) -> list[bytes]:
    lines = list(lines)
    kind = m[0]
    i = m[1] % len(lines)
    if kind == "delete_byte" and lines[i]:
        j = m[1] % len(lines[i])
        lines[i] = lines[i][:j] + lines[i][j + 1:]
    elif kind == "insert_bytes":
        j = m[1] % (len(lines[i]) + 1)
        lines[i] = lines[i][:j] + m[2].replace(b"\n", b" ") + lines[i][j:]
    elif kind == "drop_line":
        del lines[i]
    elif kind == "swap_lines":
        k = m[2] % len(lines)
        lines[i], lines[k] = lines[k], lines[i]
    elif kind in ("retype", "set_value"):
        try:
            msg = orjson.loads(lines[i])
        except orjson.JSONDecodeError:
            return lines
        if kind == "retype":
            msg["type"] = m[2]
        elif msg.get("type") == "RECORD" and msg.get("record"):
            key = sorted(msg["record"])[m[1] % len(msg["record"])]
            msg["record"][key] = m[2]
        lines[i] = orjson.dumps(msg)
    return lines


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutation, min_size=1, max_size=3))
def test_mutated_input_loads_or_fails_cleanly(tmp_path_factory, mutations):
    lines = BASE
    for m in mutations:
        lines = apply(lines, m)
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "t.json").write_text(json.dumps({"duckdb_path": str(tmp / "out.duckdb")}))
    result = run_cli(["--config", str(tmp / "t.json")], input_bytes=b"\n".join(lines) + b"\n", timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    positions = {}
    for n, raw in enumerate(lines, 1):
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(msg, dict) and str(msg.get("type", "")).upper() == "STATE" and "value" in msg:
            positions.setdefault(orjson.dumps(msg["value"]), n)
    printed = [positions.get(orjson.dumps(v)) for v in result.states]
    assert None not in printed, "a STATE not in the input was printed"
    if result.returncode == 0:
        return
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("singer-ingest: error: "), result.stderr
    m = re.search(r"input line (\d+)", last)
    assert m, last
    bad = int(m.group(1))
    assert all(p < bad for p in printed), (printed, bad)
