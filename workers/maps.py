"""Stream maps and flattening: singer-sdk's own mapper, used as a library, in the workers.

The settings and their meaning are singer-sdk's (``stream_maps``, ``stream_map_config``, ``flattening_enabled``,
``flattening_max_depth``): ``__alias__``, ``__filter__``, ``__key_properties__``, ``__else__: null``, a property
set to null (or ``__NULL__``) to drop it, new properties from expressions with ``md5()``, ``sha256()`` and the
other functions singer-sdk gives them, a stream set to null to leave it out. Rather than copy those semantics,
the worker calls ``singer_sdk.mapper.PluginMapper``: a stream's SCHEMA is registered with it, and the map it
returns gives the table's name (the alias), the schema the records are validated against (the mapped one) and
the key properties; each record is transformed before validation. singer-sdk is an extra
(``singer-ingest[maps]``): runs without maps or flattening never import it, and keep the typed fast path.

One input stream loads one table: ``__source__`` (a stream copied into a second one) is refused at start, since a
stream's records commit with its one offset into its one table.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ingest.config import ConnectionSettings, RunSettings
from ingest.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

NULL = "__NULL__"
_OPTIONS = ("__alias__", "__filter__", "__key_properties__", "__else__")
INSTALL_HINT = "install it with: pip install 'singer-ingest[maps]'"


def wanted(run: RunSettings) -> bool:
    return bool(run.stream_maps) or run.flattening_enabled


def _parse(expr: str, where: str) -> None:
    try:
        tree = ast.parse(expr)
    except SyntaxError as exc:
        raise ConfigError(f"stream_maps: {where}: expression {expr!r} is not valid: {exc.msg}; fix the "
                          f"expression (Python syntax, as singer-sdk evaluates it)") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        raise ConfigError(f"stream_maps: {where}: {expr!r} must be one expression")


def check(run: RunSettings, *, here: bool = True) -> None:
    """Refuse, at start, stream maps and flattening settings that cannot work: the structure, every expression's
    syntax (naming the stream and the expression), flattening without a depth; and singer-sdk not installed, when
    the maps apply in this process (``here``: the feeder of a distributed run leaves that to each worker)."""
    if not wanted(run):
        return
    if run.flattening_enabled and not run.flattening_max_depth:
        raise ConfigError("flattening_enabled needs flattening_max_depth (how many levels of nested objects "
                          "become columns), as in singer-sdk")
    maps = run.stream_maps or {}
    for stream, spec in maps.items():
        if stream == "__else__":
            if spec not in (None, NULL):
                raise ConfigError(f"stream_maps: __else__ can only be null (leave unmapped streams out), got {spec!r}")
            continue
        if stream.startswith("__"):
            raise ConfigError(f"stream_maps: {stream!r} is not an option; the top-level keys are stream names (or "
                              f"patterns) and __else__")
        if spec in (None, NULL):
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"stream_maps: stream {stream!r}: expected an object, null or \"{NULL}\", got {spec!r}")
        if "__source__" in spec:
            raise ConfigError(f"stream_maps: stream {stream!r}: __source__ (a copy of stream "
                              f"{spec['__source__']!r} into a second table) is not supported: each input stream "
                              f"loads one table with its one offset. Map the stream itself, with __alias__ to "
                              f"rename its table")
        for prop, expr in spec.items():
            where = f"stream {stream!r}, {prop}"
            if prop == "__alias__":
                if not isinstance(expr, str) or not expr:
                    raise ConfigError(f"stream_maps: {where}: expected a stream name, got {expr!r}")
            elif prop == "__key_properties__":
                if expr is not None and not (isinstance(expr, list) and all(isinstance(k, str) for k in expr)):
                    raise ConfigError(f"stream_maps: {where}: expected a list of property names or null, "
                                      f"got {expr!r}")
            elif prop == "__else__":
                if expr not in (None, NULL):
                    raise ConfigError(f"stream_maps: {where}: only null is supported (leave unmapped properties "
                                      f"out), got {expr!r}")
            elif prop.startswith("__") and prop != "__filter__":
                raise ConfigError(f"stream_maps: {where}: unknown option; the options are "
                                  f"{', '.join(_OPTIONS)}")
            elif expr in (None, NULL):
                continue
            elif not isinstance(expr, str):
                raise ConfigError(f"stream_maps: {where}: expected an expression (a string) or null, got {expr!r}")
            else:
                _parse(expr, where)
    if here and importlib.util.find_spec("singer_sdk") is None:
        raise ConfigError(f"stream_maps and flattening_enabled use singer-sdk's mapper, which is not installed "
                          f"where this runs; {INSTALL_HINT}")


@dataclass(frozen=True)
class StreamMap:
    """What the map makes of one stream under its current SCHEMA."""

    table: str                                  # the stream's alias: the table its records load
    schema: dict                                # the mapped schema, which records are validated against
    key_properties: tuple[str, ...]
    transform: Callable[[dict, int], dict | None] | None  # None: the stream is left out (mapped to null)


class Mapper:
    """singer-sdk's ``PluginMapper`` for one stream sink (each sink its own: the mapper keeps state per stream)."""

    def __init__(self, run: RunSettings, connection: ConnectionSettings):
        try:
            from singer_sdk.exceptions import MapExpressionError, StreamMapConfigError
            from singer_sdk.mapper import PluginMapper, RemoveRecordTransform
        except ImportError as exc:
            raise ConfigError(f"stream maps need singer-sdk's mapper, which cannot be imported here ({exc}); "
                              f"{INSTALL_HINT}") from None
        self._errors = (MapExpressionError, StreamMapConfigError)
        self._removed = RemoveRecordTransform
        config: dict[str, Any] = {"stream_maps": copy.deepcopy(dict(run.stream_maps or {})),
                                  "stream_map_config": dict(connection.stream_map_config or {}),
                                  "flattening_enabled": run.flattening_enabled}
        if run.flattening_max_depth is not None:
            config["flattening_max_depth"] = run.flattening_max_depth
        try:
            self._mapper = PluginMapper(plugin_config=config, logger=logger)
        except self._errors + (ValueError,) as exc:
            raise ConfigError(f"stream_maps: {exc}") from None

    def stream(self, name: str, schema: Mapping, key_properties: tuple[str, ...], *, line: int) -> StreamMap:
        try:
            self._mapper.register_raw_stream_schema(name, copy.deepcopy(dict(schema)), list(key_properties))
        except self._errors + (NotImplementedError,) as exc:
            raise InputError(f"stream map of this stream cannot apply to its SCHEMA: {_cause(exc)}", line=line,
                             stream=name, hint="Fix the stream's entry in stream_maps") from None
        maps = self._mapper.stream_maps[name]
        if len(maps) != 1:
            raise InputError(f"stream maps make {len(maps)} streams of this one", line=line, stream=name,
                             hint="Each input stream loads one table: remove the __source__ maps of it")
        m = maps[0]
        if isinstance(m, self._removed):
            return StreamMap(m.stream_alias, dict(schema), tuple(key_properties), None)
        def transform(record: dict, seq: int) -> dict | None:
            try:
                return m.transform(record)
            except Exception as exc:  # an expression may raise anything (ZeroDivisionError, TypeError, KeyError ...)
                raise InputError(f"stream map failed on this record: {_cause(exc)}", line=seq, stream=name,
                                 hint="Fix the expression in stream_maps, or filter such records out with "
                                      "__filter__") from None

        return StreamMap(m.stream_alias, m.transformed_schema, tuple(m.transformed_key_properties or ()), transform)


def _cause(exc: BaseException) -> str:
    """singer-sdk's message, with the simpleeval error under it (a name not defined, a function unknown, ...)."""
    cause = exc.__cause__
    if cause is not None:
        return f"{exc} ({type(cause).__name__}: {cause})"
    return str(exc) if type(exc).__module__.startswith("singer_sdk") else f"{type(exc).__name__}: {exc}"
