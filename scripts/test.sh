#!/usr/bin/env bash
# Installs what the tests need (a virtualenv with the package and its test extras, Redis and
# PostgreSQL servers, the local BigQuery server) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# The local Snowflake stand-in of the snowflake destination's tests (tests/snowserver.py) lives in a virtualenv
# of its own: fakesnow pins its own duckdb and sqlglot, which the product's dependencies must not be held to.
if [ ! -x .cache/fakesnow/bin/python ]; then
  "$PY" -m venv .cache/fakesnow
fi
.cache/fakesnow/bin/python -m pip install -q --disable-pip-version-check 'fakesnow[server]==0.12.1' \
  'snowflake-connector-python>=4.0,<5'
scripts/services.sh
scripts/bqemulator.sh   # the local BigQuery server of the bigquery destination's tests, in its own virtualenv
exec .venv/bin/python -m pytest "$@"
