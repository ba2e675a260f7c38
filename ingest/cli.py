"""Command line: ``singer-ingest [--config target.json] [--input FILE] [--redis-url URL] [--run-id ID]`` loads
tap output (the command Singer and Meltano run: no subcommand); ``singer-ingest state ...`` and
``singer-ingest status ...`` read runs back from Redis; ``singer-ingest delta optimize|vacuum ...`` compacts or
vacuums the delta destination's tables.

stdout carries STATE lines only; the summary, logs and errors go to stderr. Exit status: 0 when the
run is loaded and its last STATE printed, 1 when the input or the run failed, 2 for a usage or
configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import uuid

import orjson
import redis

from . import logs
from .config import ENV_PREFIX, load_target_config, settings_by_name
from .errors import ConfigError, IngestError
from .process import limit_malloc_arenas, tune_gc
from .progress import LiveProgress, LogProgress
from .wire import RunKeys

logger = logging.getLogger("singer-ingest")
PROG = "singer-ingest"
LOGGERS = ("ingest", "workers", "sinks", "singer-ingest")


SUBCOMMANDS = {
    "state": "print the last committed STATE of a run (from Redis)",
    "status": "show the runs in Redis: streams, owners, backlog, rows committed, last STATE",
    "delta": "compact (optimize) or vacuum the delta destination's tables",
}


def _subcommands_text() -> str:
    lines = [f"  {name:8s} {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(["subcommands (`singer-ingest SUBCOMMAND --help` for their options):", *lines,
                      "without a subcommand, singer-ingest loads tap output (the command Singer and Meltano run)"])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, usage=f"{PROG} [options]\n       {PROG} {{{','.join(SUBCOMMANDS)}}} ...",
                                description="Load Singer tap output through Redis Streams and RQ workers into a "
                                            "destination; print committed STATE.",
                                epilog=_subcommands_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("subcommand", nargs="?", metavar="SUBCOMMAND",
                   help=f"one of {', '.join(SUBCOMMANDS)} (see below), given first; none: load tap output")
    p.add_argument("--config", help="target config JSON (Singer convention)")
    p.add_argument("--input", help="read tap output from this file instead of stdin")
    p.add_argument("--redis-url", help=f"Redis for the distributed mode (env {ENV_PREFIX}REDIS_URL); "
                                       "without it everything runs in this process")
    p.add_argument("--run-id", help="id of this run (default: generated)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="least severe log lines shown on stderr (default warning)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="stderr as readable lines or one JSON object a line")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress and no summary on stderr, only warnings and errors")
    p.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress log lines when stderr is not a terminal (default 10)")
    p.add_argument("--about", action="store_true", help="describe the target and every setting, then exit")
    p.add_argument("--format", choices=["json", "markdown"], help="format of --about (default json)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def _state_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} state", description="Print the last committed STATE of a run.")
    p.add_argument("--run-id", required=True, help="the run (its feeder's --run-id, or the id `status` lists)")
    p.add_argument("--value", action="store_true",
                   help="print the bare state value (what a tap's --state file holds) instead of a STATE message")
    p.add_argument("--redis-url", help=f"Redis URL (env {ENV_PREFIX}REDIS_URL)")
    return p


def _status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} status", description="Show runs in Redis: streams, owners, "
                                                                    "backlog, rows committed, last STATE.")
    p.add_argument("--run-id", help="one run (default: the 20 most recent)")
    p.add_argument("--redis-url", help=f"Redis URL (env {ENV_PREFIX}REDIS_URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _status(args: argparse.Namespace) -> int:
    from .status import all_runs, render, run_status

    url = args.redis_url or os.environ.get(ENV_PREFIX + "REDIS_URL")
    if not url:
        _error("status needs --redis-url (or SINGER_INGEST_REDIS_URL)")
        return 2
    try:
        conn = redis.Redis.from_url(url)
        runs = [run_status(conn, args.run_id)] if args.run_id else all_runs(conn)
    except redis.RedisError as exc:
        _error(f"cannot read from Redis: {exc}")
        return 1
    if args.run_id and runs[0] is None:
        _error(f"no run {args.run_id!r} in this Redis (unknown, or expired after run_ttl_seconds)")
        return 1
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(runs if not args.run_id else runs[0], option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(render(runs))
    return 0


_log_format = "text"


def _say(level: int, text: str, message: str, **fields) -> None:
    """A line of the CLI's own on stderr: ``text`` as is, or ``message`` and ``fields`` as a JSON log record."""
    if _log_format == "json":
        record = logging.LogRecord(PROG, level, __file__, 0, message, None, None)
        record.__dict__.update(fields)
        text = logs.formatter("json").format(record)
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _error(message: str) -> None:
    _say(logging.ERROR, f"{PROG}: error: {message}", message)


def _setup_logging(args: argparse.Namespace):
    """Loggers to stderr; returns the progress reporter (None with --quiet)."""
    global _log_format
    _log_format = args.log_format
    show_progress = not args.quiet and args.log_level != "error"
    live = show_progress and args.log_format == "text" and sys.stderr.isatty()
    handler = None
    console = None
    if live:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler = RichHandler(console=console, show_path=False)
    logs.configure(LOGGERS, args.log_level, args.log_format, handler)
    if not show_progress:
        return None
    if live:
        return LiveProgress(console)
    logging.getLogger("ingest.progress").setLevel(logging.INFO)
    return LogProgress(args.progress_interval)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "state":
        return _state(_state_parser().parse_args(argv[1:]))
    if argv and argv[0] == "status":
        return _status(_status_parser().parse_args(argv[1:]))
    if argv and argv[0] == "delta":
        return _delta(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.subcommand in SUBCOMMANDS:
        parser.error(f"a subcommand goes first, before any option: {PROG} {args.subcommand} ...")
    if args.subcommand is not None:
        parser.error(f"{args.subcommand!r} is not a subcommand; the subcommands are {', '.join(SUBCOMMANDS)} "
                     f"(without one, {PROG} loads tap output from --input or stdin)")
    if args.format is not None and not args.about:
        parser.error("--format applies to --about only (the load command's output is STATE lines)")
    if args.version or args.about:
        from . import about

        if args.version:
            sys.stdout.write(f"{about.NAME} {about.package_version()}\n")
        elif args.format == "markdown":
            sys.stdout.write(about.about_markdown())
        else:
            sys.stdout.buffer.write(about.about_json())
        return 0
    return _run(args)


def _delta(argv: list[str]) -> int:
    from sinks import kit

    try:
        kit.get("delta").check_installed()
    except ConfigError as exc:
        _error(str(exc))
        return 2
    logs.configure(LOGGERS, "warning", "text", None)
    from sinks.delta.maintenance import main as delta_main

    return delta_main(argv)


def _state(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get(ENV_PREFIX + "REDIS_URL")
    if not url:
        _error("state needs --redis-url (or SINGER_INGEST_REDIS_URL): embedded runs keep no state after they end")
        return 2
    try:
        value = redis.Redis.from_url(url).get(RunKeys(args.run_id).state)
    except redis.RedisError as exc:
        _error(f"cannot read from Redis: {exc}")
        return 1
    if value is None:
        _error(f"no committed STATE for run {args.run_id!r} (unknown run, nothing committed yet, or expired)")
        return 1
    state = orjson.loads(value)
    sys.stdout.buffer.write(orjson.dumps(state if args.value else {"type": "STATE", "value": state}) + b"\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.progress_interval <= 0:
        _error("--progress-interval must be positive")
        return 2
    progress = _setup_logging(args)
    limit_malloc_arenas()
    tune_gc()
    try:
        config = load_target_config(args.config, overrides={"redis_url": args.redis_url})
    except ConfigError as exc:
        _error(str(exc))
        return 2
    # Workers may run elsewhere: a relative path (the DuckDB file) means the feeder's directory; a URL
    # (s3://bucket/prefix) stays as it is.
    from sinks import kit

    paths = {name: os.path.abspath(value) for name, value in config.run.destination_settings.items()
             if value and settings_by_name()[name].path and "://" not in value}
    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, destination_settings={**config.run.destination_settings, **paths}))
    plugin = kit.get(config.run.destination)
    from workers import maps

    try:
        maps.check(config.run, here=not config.feeder.redis_url)
    except ConfigError as exc:
        _error(str(exc))
        return 2
    if not config.feeder.redis_url:
        try:  # this process is the worker: its driver must be here (a worker host's is checked there)
            plugin.check_installed()
        except ConfigError as exc:
            _error(str(exc))
            return 2
    run_id = args.run_id or uuid.uuid4().hex[:12]
    try:
        source = open(args.input, "rb") if args.input else sys.stdin.buffer
    except OSError as exc:
        _error(f"cannot open input {args.input}: {exc.strerror}")
        return 2
    from .feeder import Feeder

    if config.feeder.redis_url:
        from .dispatch import RQDispatcher

        try:
            conn = redis.Redis.from_url(config.feeder.redis_url)
            conn.ping()
        except (redis.RedisError, ValueError) as exc:
            _error(f"cannot reach Redis at the configured redis_url: {exc}. Start Redis or fix the URL")
            return 2
        dispatcher = RQDispatcher(conn, run_id, config.feeder, config.run.lease_ttl_seconds)
    else:
        import fakeredis

        from .dispatch import EmbeddedDispatcher

        conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        dispatcher = EmbeddedDispatcher(conn, run_id, config.connection)
    feeder = Feeder(conn, run_id, config, dispatcher, sys.stdout.buffer, progress=progress)
    # On failure the run is marked failed in Redis before the error line is printed, so that line stays the
    # last one on stderr even when marking fails too (Redis gone) and logs a warning.
    try:
        try:
            summary = feeder.run(source)
        finally:
            if progress is not None:
                progress.close(feeder.snapshot())
    except IngestError as exc:
        if not isinstance(exc, ConfigError) or "already exists" not in str(exc):
            feeder.fail_run(exc.user_message())
        _error(exc.user_message())
        return 2 if isinstance(exc, ConfigError) else 1
    except redis.RedisError as exc:
        _error(f"Redis failed during the run ({exc}); the last STATE printed is safe to resume from")
        return 1
    except KeyboardInterrupt:
        feeder.fail_run("the feeder was interrupted")
        _error("interrupted; the last STATE printed is safe to resume from")
        return 130
    except Exception as exc:
        logger.debug("internal error", exc_info=True)
        feeder.fail_run(f"the feeder failed: {type(exc).__name__}: {exc}")
        _error(f"internal error: {type(exc).__name__}: {exc} (run with --log-level debug for the traceback; "
               f"the last STATE printed is safe to resume from)")
        return 1
    finally:
        dispatcher.close()
        if source is not sys.stdin.buffer:
            source.close()
    if args.quiet:
        return 0
    rows = ", ".join(f"{name}: {n}" for name, n in summary.rows.items())
    total = sum(summary.rows.values())
    rate = total / summary.seconds if summary.seconds > 0 else 0.0
    where = config.run.option(plugin.target_setting) if plugin.target_setting else config.run.destination
    text = (f"run {run_id} done in {summary.seconds:.2f} s: {total} rows into {where} ({rate:,.0f} rows/s); "
            f"{rows or 'no streams'}")
    if summary.undeclared:
        dropped = "; ".join(f"{name}: {n} (properties {', '.join(summary.undeclared_properties.get(name, []))})"
                            for name, n in summary.undeclared.items())
        text += f". Records with properties their schema does not declare, not loaded: {dropped}"
    if summary.dead_letters:
        text += (". Records set aside in the dead-letter table: "
                 + "; ".join(f"{name}: {n}" for name, n in summary.dead_letters.items()))
    _say(logging.INFO, f"{PROG}: {text}", text, run=run_id, seconds=round(summary.seconds, 3), rows=summary.rows,
         rows_per_second=round(rate, 1), destination=where, lines=summary.lines,
         records_with_undeclared_properties=summary.undeclared,
         undeclared_properties=summary.undeclared_properties, dead_letters=summary.dead_letters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
