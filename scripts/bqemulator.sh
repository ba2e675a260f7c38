#!/usr/bin/env bash
# The local BigQuery server the bigquery destination's tests run against (bqemulator), in a virtualenv of its
# own under .cache/ (it pins duckdb 1.5.5, which the project's own duckdb need not match). Idempotent.
# Offline, DuckDB cannot download its spatial extension, which bqemulator loads at start: the extension comes
# from PyPI (duckdb-extension-spatial) and is copied where DuckDB looks for it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.cache/bqemulator
VERSION=1.4.0
DUCKDB=1.5.5
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
installed=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("bqemulator"))' 2>/dev/null || true)
if [ "$installed" != "$VERSION" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "bqemulator==$VERSION" \
    "duckdb-extension-spatial==$DUCKDB" numpy
fi
EXT_DIR="$HOME/.duckdb/extensions/v$DUCKDB/linux_amd64"
if [ ! -f "$EXT_DIR/spatial.duckdb_extension" ]; then
  mkdir -p "$EXT_DIR"
  cp "$("$VENV/bin/python" -c 'import duckdb_extension_spatial, pathlib; print(next(pathlib.Path(duckdb_extension_spatial.__file__).parent.rglob("spatial.duckdb_extension")))')" "$EXT_DIR/"
fi
