"""Compaction and vacuum of the delta destination's tables:
``singer-ingest delta optimize|vacuum --config target.json [--stream NAME ...]``.

Every batch commits its own Parquet files (as large as the batch), so a table loaded in many small batches,
or by long runs with a short ``max_record_age_seconds``, gathers many small files, and every reader lists and
opens each of them. ``optimize`` rewrites a table's small files into files of about ``--target-size`` bytes
(default 256 MB) in one commit; readers keep reading the old files until they load the new snapshot, and
loads may go on meanwhile (a merge that read files the compaction replaced conflicts and is retried from a
fresh snapshot; appends are not affected). Run it daily, or after a large backfill. ``vacuum`` deletes the
files no snapshot younger than ``--retention-hours`` (default 168, Delta's default) refers to: what optimize
and merges replaced. A reader still on an older snapshot (time travel, a long query) then fails, so keep the
retention longer than the longest query; run it weekly. Neither touches the tables' offsets (the txn ids live
in the log's snapshot, not in data files).

The tables are found under ``delta_uri`` (and ``default_target_schema``'s folder) from the target config; the
S3 settings are read as a worker reads them (config file, then ``SINGER_INGEST_*`` environment).
"""

from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlsplit

from ingest.config import ConnectionSettings, load_target_config
from ingest.errors import ConfigError, IngestError

logger = logging.getLogger(__name__)
PROG = "singer-ingest delta"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Compact (optimize) or vacuum the delta destination's "
                                                       "tables.")
    p.add_argument("action", choices=["optimize", "vacuum"])
    p.add_argument("--config", required=True, help="the target config naming delta_uri (and S3 settings)")
    p.add_argument("--stream", action="append", help="only this stream's table (repeatable; default: all tables)")
    p.add_argument("--target-size", type=int, default=256 * 1024 * 1024, metavar="BYTES",
                   help="optimize: size of the compacted files (default 256 MB)")
    p.add_argument("--retention-hours", type=int, default=168,
                   help="vacuum: keep files that snapshots of the last this many hours refer to (default 168)")
    p.add_argument("--dry-run", action="store_true", help="vacuum: list what would be deleted, delete nothing")
    return p


def _filesystem(root: str, connection: ConnectionSettings):
    """A pyarrow filesystem and the path of ``root`` on it, to list the tables."""
    from pyarrow import fs

    if not root.startswith("s3://"):
        return fs.LocalFileSystem(), root
    endpoint = connection.option("delta_s3_endpoint_url")
    kwargs = {"access_key": connection.option("delta_s3_access_key_id"),
              "secret_key": connection.option("delta_s3_secret_access_key"),
              "session_token": connection.option("delta_s3_session_token"),
              "region": connection.option("delta_s3_region")}
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs["endpoint_override"] = parts.netloc or parts.path
        kwargs["scheme"] = parts.scheme or "https"
    return fs.S3FileSystem(**{k: v for k, v in kwargs.items() if v}), root[len("s3://"):]


def table_names(root: str, connection: ConnectionSettings) -> list[str]:
    from pyarrow import fs

    filesystem, path = _filesystem(root, connection)
    try:
        entries = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise ConfigError(f"cannot list the tables under delta_uri: {exc}") from None
    names = []
    for entry in entries:
        if entry.type == fs.FileType.Directory:
            log = filesystem.get_file_info(entry.path.rstrip("/") + "/_delta_log")
            if log.type == fs.FileType.Directory or (root.startswith("s3://") and log.type != fs.FileType.NotFound):
                names.append(entry.base_name)
    return sorted(names)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from deltalake.exceptions import DeltaError

    from sinks.names import normalise

    from .destination import MAX_IDENTIFIER_BYTES, DeltaDestination, storage_options

    try:
        config = load_target_config(args.config)
        uri = config.run.option("delta_uri")
        if not uri:
            raise ConfigError(f"config file {args.config} names no delta_uri")
        d = DeltaDestination(uri, config.run.default_target_schema, storage_options(config.connection))
        names = [normalise(s, MAX_IDENTIFIER_BYTES) for s in args.stream] if args.stream else \
            table_names(d.root, config.connection)
    except IngestError as exc:
        sys.stderr.write(f"{PROG}: error: {exc.user_message()}\n")
        return 2
    failed = 0
    for name in names:
        dt = d._fresh(name)
        if dt is None:
            sys.stderr.write(f"{PROG}: error: no Delta table {name} under delta_uri\n")
            failed += 1
            continue
        try:
            if args.action == "optimize":
                m = dt.optimize.compact(target_size=args.target_size)
                sys.stdout.write(f"{name}: {m.get('numFilesRemoved', 0)} files compacted into "
                                 f"{m.get('numFilesAdded', 0)}\n")
            else:
                removed = dt.vacuum(retention_hours=args.retention_hours, dry_run=args.dry_run,
                                    enforce_retention_duration=False)
                verb = "would delete" if args.dry_run else "deleted"
                sys.stdout.write(f"{name}: {verb} {len(removed)} files no snapshot of the last "
                                 f"{args.retention_hours} hours refers to\n")
        except (DeltaError, OSError) as exc:
            sys.stderr.write(f"{PROG}: error: table {name}: {exc} (nothing lost; run it again)\n")
            failed += 1
    return 1 if failed else 0
