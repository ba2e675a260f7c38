"""What the feeder shows while it runs: a live table on a terminal, log lines elsewhere, JSON logs, --quiet."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess

import orjson

from .conftest import BIN, generate
from .expected import model


def _config(tmp_path) -> str:
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"duckdb_path": str(tmp_path / "out.duckdb"), "batch_size_rows": 2000}))
    return str(path)


def _records(data: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in data.splitlines():
        msg = orjson.loads(line)
        if msg["type"] == "RECORD":
            out[msg["stream"]] = out.get(msg["stream"], 0) + 1
    return out


def test_off_a_terminal_progress_is_a_periodic_log_line(cli, tmp_path):
    data = generate(20000)
    result = cli(["--config", _config(tmp_path), "--progress-interval", "0.05"], input_bytes=data)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "ingest.progress" in line]
    assert progress, result.stderr
    assert all("loaded/received" in line and "backlog" in line for line in progress)
    assert re.search(r"users [\d,]+/[\d,]+ \([\d,]+/s\)", progress[-1]), progress[-1]
    assert result.stderr.splitlines()[-1].startswith("singer-ingest: run ")
    assert result.states[-1] == model(data)["users"]["last_state"]  # stdout: STATE lines only


def test_quiet_prints_nothing_but_state(cli, tmp_path):
    data = generate(5000)
    result = cli(["--config", _config(tmp_path), "--quiet", "--progress-interval", "0.01"], input_bytes=data)
    assert result.returncode == 0 and result.stderr == ""
    assert result.states[-1] == model(data)["users"]["last_state"]


def test_json_logs_carry_progress_fields_summary_and_errors(cli, tmp_path):
    data = generate(20000)
    result = cli(["--config", _config(tmp_path), "--log-format", "json", "--progress-interval", "0.05"],
                 input_bytes=data)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    progress = [r for r in records if r["logger"] == "ingest.progress"]
    assert progress
    totals = _records(data)
    for r in progress:
        assert set(r["streams"]) <= set(totals)
        for name, s in r["streams"].items():
            assert 0 <= s["loaded"] and s["received"] <= totals[name]
    summary = records[-1]
    assert summary["logger"] == "singer-ingest" and summary["level"] == "INFO"
    assert set(summary["rows"]) == set(totals) and summary["lines"] == len(data.splitlines())

    bad = data.replace(b'{"type":"RECORD"', b'{"type":"RECORD",', 1)
    failed = cli(["--config", _config(tmp_path), "--log-format", "json"], input_bytes=bad)
    assert failed.returncode == 1
    error = json.loads(failed.stderr.splitlines()[-1])
    assert error["level"] == "ERROR" and "line" in error["message"], error


def test_on_a_terminal_a_live_table_shows_streams_and_totals(tmp_path):
    data = generate(20000)
    (tmp_path / "in.singer").write_bytes(data)
    main, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINGER_INGEST_")}
    env.update(COLUMNS="140", LINES="40", TERM="xterm")
    proc = subprocess.Popen([str(BIN / "singer-ingest"), "--config", _config(tmp_path), "--input",
                             str(tmp_path / "in.singer")], stdout=subprocess.PIPE, stderr=secondary, env=env)
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    stdout, _ = proc.communicate(timeout=120)
    os.close(main)
    assert proc.returncode == 0, screen.decode(errors="replace")
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", screen).decode(errors="replace")
    assert "received" in text and "loaded" in text and "rows/s" in text, text
    totals = _records(data)
    final = text[text.rindex("singer-ingest run"):]
    for name, n in totals.items():
        assert re.search(rf"{name}\s*│\s*{n:,}\s*│", final), final
    assert re.search(rf"all\s*│\s*{sum(totals.values()):,}\s*│", final), final
    assert "last STATE input line" in final
    assert all(orjson.loads(line)["type"] == "STATE" for line in stdout.splitlines())
