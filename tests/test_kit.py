"""The destination kit: the registry a third-party package extends, settings declared once, a missing driver."""

from __future__ import annotations

import json
import os
from pathlib import Path

import orjson
import pytest

from ingest.config import Setting, all_settings
from ingest.errors import ConfigError
from sinks import kit

from .conftest import Workers, run_cli

PLUGIN = '''
from ingest.config import Setting
from sinks import kit

DESTINATION = kit.DestinationPlugin(
    name="lakehouse", exactness=kit.ATOMIC_COMMIT, description="A third-party destination.",
    factory="singer_ingest_lakehouse:open_destination", extra="lakehouse", requires=("lakehouse_driver_xyz",),
    settings=(Setting("lakehouse_token", str, None, "worker", "Token of the lakehouse.", secret=True),),
)
'''


@pytest.fixture()
def third_party(tmp_path) -> dict:
    """A package installed beside singer-ingest that registers a destination whose driver is missing."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "singer_ingest_lakehouse.py").write_text(PLUGIN)
    info = site / "singer_ingest_lakehouse-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: singer-ingest-lakehouse\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[singer_ingest.destinations]\nlakehouse = singer_ingest_lakehouse:DESTINATION\n")
    return {"PYTHONPATH": str(site)}


def test_every_built_in_destination_is_registered_with_its_class_and_settings():
    plugins = kit.plugins()
    assert list(plugins)[:8] == ["bigquery", "delta", "duckdb", "elasticsearch", "mongodb", "mysql", "postgres",
                                 "snowflake"]
    assert {p.exactness for p in plugins.values()} <= set(kit.EXACTNESS)
    declared = {s.name: s.destination for s in all_settings()}
    assert declared["duckdb_path"] == "duckdb" and declared["postgres_dsn"] == "postgres"
    assert declared["mysql_url"] == "mysql" and declared["delta_uri"] == "delta" and declared["batch_size_rows"] is None
    assert declared["elasticsearch_url"] == "elasticsearch"
    assert declared["bigquery_project"] == "bigquery" and plugins["bigquery"].exactness == kit.ATOMIC_COMMIT
    assert declared["mongodb_url"] == "mongodb" and plugins["mongodb"].exactness == kit.IDEMPOTENT
    destination = next(s for s in all_settings() if s.name == "destination")
    assert destination.choices == tuple(plugins)
    with pytest.raises(ConfigError, match="unknown destination 'nope'; registered destinations: bigquery, delta, duckdb"):
        kit.get("nope")


def test_a_declaration_keeps_secrets_off_the_run_and_a_missing_driver_names_the_extra():
    with pytest.raises(ValueError, match="would travel through Redis"):
        kit.DestinationPlugin(name="x", exactness=kit.IDEMPOTENT, description="", factory="m:f",
                              settings=(Setting("x_key", str, None, "run", "", secret=True),))
    with pytest.raises(ValueError, match="exactness"):
        kit.DestinationPlugin(name="x", exactness="eventually", description="", factory="m:f")
    plugin = kit.DestinationPlugin(name="x", exactness=kit.IDEMPOTENT, description="", factory="m:f", extra="x",
                                   requires=("no_such_driver_module_xyz",))
    with pytest.raises(ConfigError, match=r"needs the Python package no_such_driver_module_xyz.*"
                                          r"pip install 'singer-ingest\[x\]'"):
        plugin.check_installed()


def test_a_third_party_destination_shows_in_about_and_its_missing_driver_is_a_clear_error(third_party, tmp_path):
    about = orjson.loads(run_cli(["--about"], env=third_party).stdout)
    assert {"name": "lakehouse", "exactness": "atomic-commit", "description": "A third-party destination.",
            "extra": "lakehouse"} in about["destinations"]
    token = next(s for s in about["settings"] if s["name"] == "lakehouse_token")
    assert token["destination"] == "lakehouse" and token["secret"] and token["scope"] == "worker"
    config = tmp_path / "t.json"
    config.write_text(json.dumps({"destination": "lakehouse", "lakehouse_token": "s3cr3t"}))
    result = run_cli(["--config", str(config)], input_bytes=b"", env=third_party, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("singer-ingest: error: destination 'lakehouse' needs the Python package "
                                     "lakehouse_driver_xyz, which is not installed where this runs; install it "
                                     "with: pip install 'singer-ingest[lakehouse]'")
    # Without the package, the name is refused as a choice naming the registered ones.
    result = run_cli(["--config", str(config)], input_bytes=b"", cwd=tmp_path)
    assert result.returncode == 2 and "unknown setting 'lakehouse_token'" in result.stderr


def test_a_worker_without_the_driver_fails_the_run_with_the_extra_to_install(third_party, fresh_redis, redis_url,
                                                                            run_id, tmp_path):
    workers = Workers(redis_url, tmp_path, env=third_party)
    workers.start(1)
    try:
        config = tmp_path / "t.json"
        config.write_text(json.dumps({"destination": "lakehouse"}))
        data = (b'{"type":"SCHEMA","stream":"s","schema":{"properties":{"id":{"type":"integer"}}},'
                b'"key_properties":["id"]}\n{"type":"RECORD","stream":"s","record":{"id":1}}\n')
        env = {**third_party, "PYTHONPATH": third_party["PYTHONPATH"] + os.pathsep + os.environ.get("PYTHONPATH", "")}
        result = run_cli(["--config", str(config), "--redis-url", redis_url, "--run-id", run_id], input_bytes=data,
                         env=env, cwd=tmp_path, timeout=120)
    finally:
        workers.stop()
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "pip install 'singer-ingest[lakehouse]'" in last and "on host" in last, last
    assert "Traceback" not in result.stderr
    assert "Traceback" not in workers.logs().split("singer-ingest[lakehouse]")[0]
    assert not list(Path(tmp_path).glob("*.duckdb"))


def test_reading_the_registry_imports_no_driver():
    """The feeder reads every declaration (settings, choices) and loads no destination: no driver in its memory."""
    import subprocess
    import sys

    drivers = ("duckdb", "psycopg2", "pymysql", "deltalake", "pyarrow", "google.cloud.bigquery")
    code = ("import sys; from ingest import about; about.about(); "
            f"print(sorted(m for m in {drivers!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
