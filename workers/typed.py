"""Plain RECORD lines decoded straight into a stream's row, with the schema checked as they are read.

For a schema within the subset below, msgspec decodes a RECORD line into a typed struct whose fields
are the table's columns, so one C call parses the line, checks each value's type and constraints and
yields the row's values in column order, without a dict per record. It is only a shortcut: whatever it
accepts, the Draft 4 validator of ``validation.py`` accepts too, and it gives the same values that
``orjson`` would. Anything it refuses (a line of another kind, a versioned RECORD, a value it does
not cover, an invalid record) goes through the general path, which loads it or reports the error.

The subset: ``type`` (with ``null`` unions), ``enum`` of strings and integers, ``maxLength``,
``minLength``, ``pattern``, ``minimum``/``maximum`` (Draft 4 ``exclusive*`` flags), ``multipleOf``
and the ``date-time``/``date``/``time`` formats on top-level properties (checked after decoding with
the validator's own rules), ``required``, nested ``properties`` and ``items``. Other validation
keywords (``$ref``, ``anyOf``, ``additionalProperties: false`` ...) or another ``$schema`` leave the
stream on the general path.

A record's own keys must be its schema's properties: a key the schema does not declare makes the decoder
refuse the line (so the general path reports it), unless it is one of the ``undeclared`` names the decoder
was built with. Those are read as raw JSON into fields after the columns, which the caller looks at (to
count the records that carry them) and drops.
"""

from __future__ import annotations

import datetime
import math
import typing
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Callable, Literal, Optional, Union

import msgspec
import orjson

from .validation import FORMATS, multiple_of_ok

# Draft 4 keywords that constrain an instance; any of them not handled below disqualifies the schema.
_VALIDATION_KEYWORDS = frozenset((
    "$ref", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength", "minLength",
    "pattern", "additionalItems", "items", "maxItems", "minItems", "uniqueItems", "maxProperties", "minProperties",
    "required", "additionalProperties", "properties", "patternProperties", "dependencies", "enum", "type", "allOf",
    "anyOf", "oneOf", "not", "format"))
_HANDLED = frozenset((
    "type", "enum", "maxLength", "minLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "items", "properties", "required", "additionalProperties", "format", "multipleOf"))
_DRAFT4 = {"http://json-schema.org/draft-04/schema#", "http://json-schema.org/draft-04/schema"}
_CHECKED_FORMATS = ("date-time", "date", "time")
_UNSAFE_NAME = frozenset('\\"' + "".join(map(chr, range(32))))
_INT_MIN, _INT_MAX = -2**63, 2**63 - 1  # msgspec's integer bounds are 64-bit
PLACEHOLDER = "\x7f"  # names the fields of columns without a property (no property may start with it)


class Unsupported(Exception):
    """The schema uses something the typed decoding does not cover."""


@dataclass(frozen=True)
class Check:
    """A rule checked after decoding: ``bulk(values)`` may say False for valid values (the values are then
    asked one by one), never True for an invalid one; ``single(value)`` is exact."""

    bulk: Callable[[list], bool]
    single: Callable[[object], bool]


@dataclass(frozen=True)
class RecordDecoder:
    """``decode(line)`` gives the message (``.stream``, ``.record``, ``.time_extracted``); ``astuple(record)``
    gives the row's values in column order; each ``(index, check)`` of ``checks`` must accept the value at
    ``index`` (format, multipleOf, a JSON value's type) for the row to stand."""

    decode: Callable[[bytes], Any]
    checks: tuple[tuple[int, Check], ...]

    def first_invalid(self, rows: list[list], start: int) -> int | None:
        """The index of the first row from ``start`` on that a check refuses, or None."""
        first = None
        for i, check in self.checks:
            values = [r[i] for r in rows[start:first]]
            if not check.bulk(values):
                for n, v in enumerate(values):
                    if not check.single(v):
                        first = start + n
                        break
        return first


def _struct(schema: dict, name: str) -> type:
    """A struct type that accepts exactly the objects ``schema`` (properties, required) accepts, extra keys
    ignored (additionalProperties is true), for checking a nested value."""
    props = schema.get("properties") or {}
    required = schema.get("required") or []
    if not isinstance(props, dict) or not isinstance(required, list) or not set(required) <= set(props):
        raise Unsupported("required names a key without a property")
    fields, rename = [], {}
    for i, (prop, sub) in enumerate(props.items()):
        if not isinstance(prop, str) or _UNSAFE_NAME & set(prop):
            raise Unsupported(f"property name {prop!r}")
        typ = _types(sub, nested=True)
        fields.append((f"f{i}", typ) if prop in required else (f"f{i}", typ, None))
        rename[f"f{i}"] = prop
    return msgspec.defstruct(name, fields, kw_only=True, rename=rename)


def _number_meta(p: dict, integer: bool) -> dict:
    """msgspec bounds for ``minimum``/``maximum``; for integers as inclusive integer bounds within 64 bits (orjson
    reads integers beyond 64 bits as floats: those go to the general path)."""
    meta = {}
    for key, inclusive, exclusive in (("minimum", "ge", "gt"), ("maximum", "le", "lt")):
        if key not in p:
            continue
        bound, flag = p[key], p.get("exclusiveM" + key[1:], False)
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not isinstance(flag, bool) \
                or bound != bound or bound in (float("inf"), float("-inf")):
            raise Unsupported(f"{key} {bound!r}")
        if not integer:
            meta[exclusive if flag else inclusive] = bound
        elif key == "minimum":
            meta["ge"] = math.floor(bound) + 1 if flag else math.ceil(bound)
        else:
            meta["le"] = math.ceil(bound) - 1 if flag else math.floor(bound)
    if integer:
        meta["ge"] = max(meta.get("ge", _INT_MIN), _INT_MIN)
        meta["le"] = min(meta.get("le", _INT_MAX), _INT_MAX)
        if meta["ge"] > _INT_MAX or meta["le"] < _INT_MIN:
            raise Unsupported("integer bounds beyond 64 bits")
    return meta


def _types(p: object, *, nested: bool) -> Any:
    """The strict type of one property's schema."""
    if not isinstance(p, dict):
        raise Unsupported("a property schema that is not an object")
    used = _VALIDATION_KEYWORDS.intersection(p)
    if not used:
        return Any
    if used - _HANDLED:
        raise Unsupported(", ".join(sorted(used - _HANDLED)))
    if p.get("additionalProperties", True) is not True:
        raise Unsupported("additionalProperties")
    if nested and ("multipleOf" in p or p.get("format") in _CHECKED_FORMATS):
        raise Unsupported("a checked format or multipleOf below the top level")
    t = p.get("type")
    kinds = [t] if isinstance(t, str) else t if isinstance(t, list) else None
    if kinds is None or not kinds or not all(k in ("null", "string", "integer", "number", "boolean", "object", "array")
                                             for k in kinds):
        raise Unsupported(f"type {t!r}")
    if "enum" in p:
        if used - {"enum", "type", "format"}:
            raise Unsupported("enum with other constraints")
        values = p["enum"]
        if not isinstance(values, list) or any(v is not None and type(v) not in (str, int) for v in values) \
                or any(type(v) is int and not _INT_MIN <= v <= _INT_MAX for v in values):
            raise Unsupported("enum of other values")
        lits = [v for v in values if (type(v) is str and "string" in kinds)
                or (type(v) is int and ("integer" in kinds or "number" in kinds))]
        members: list = [Literal[tuple(lits)]] if lits else []
        if None in values and "null" in kinds:
            members.append(None)
        if not members:
            raise Unsupported("an enum no value of its type can match")
        return Union[tuple(members)]
    str_meta = {k: p[k] for k in ("maxLength", "minLength", "pattern") if k in p}
    str_meta = {{"maxLength": "max_length", "minLength": "min_length"}.get(k, k): v for k, v in str_meta.items()}
    members = []
    for kind in dict.fromkeys(kinds):
        if kind == "null":
            members.append(None)
        elif kind == "string":
            members.append(Annotated[str, msgspec.Meta(**str_meta)] if str_meta else str)
        elif kind == "boolean":
            members.append(bool)
        elif kind in ("integer", "number"):
            members.append(Annotated[int, msgspec.Meta(**_number_meta(p, integer=True))])  # always 64-bit bounds
            if kind == "number":
                meta = _number_meta(p, integer=False)
                members.append(Annotated[float, msgspec.Meta(**meta)] if meta else float)
        elif kind == "object":
            if "properties" in p or "required" in p:
                members.append(_struct(p, "Nested"))
            else:
                members.append(dict)
        elif kind == "array":
            items = p.get("items")
            if items is None:
                members.append(list)
            elif isinstance(items, dict):
                members.append(list[_types(items, nested=True)])
            else:
                raise Unsupported("items as a list")
    return Union[tuple(dict.fromkeys(members))]


def _fully_typed(t: Any) -> bool:
    """Every value the type admits is typed to its leaves (integers bounded to 64 bits): no struct, no untyped
    object, array or value. Decoding such a value gives what orjson gives."""
    if t is Any or t is dict or t is list:
        return False
    if isinstance(t, type) and issubclass(t, msgspec.Struct):
        return False
    origin = typing.get_origin(t)
    if origin is Annotated:
        return _fully_typed(typing.get_args(t)[0])
    if origin in (Union, list):
        return all(_fully_typed(a) for a in typing.get_args(t))
    return t in (str, int, float, bool, type(None)) or origin is Literal


def _converts(values: list, many: Any) -> bool:
    try:
        msgspec.convert(values, many)
    except msgspec.ValidationError:
        return False
    return True


def _json_check(strict: Any) -> Check:
    """A JSON value must convert to ``strict`` (nested objects checked against their struct; None: any value),
    and orjson must be able to write it: it cannot write an integer beyond 64 bits, which it reads as a float."""
    if strict is None:
        shapes = {object}
    else:  # the members of a union; any other type (list[dict] among them) is one shape of its own
        shapes = set(typing.get_args(strict)) if typing.get_origin(strict) is Union else {strict}
    if shapes <= {dict, list, type(None), object}:  # the type alone decides: no need to convert
        allowed = tuple(shapes)

        def conforms(values: list) -> bool:
            return all(isinstance(v, allowed) for v in values)
    else:
        many = list[strict]
        msgspec.json.Decoder(many)  # a type msgspec cannot check fails here, not on the first record

        def conforms(values: list) -> bool:
            return _converts(values, many)

    def bulk(values: list) -> bool:
        if not conforms(values):
            return False
        try:
            orjson.dumps(values)
        except orjson.JSONEncodeError:
            return False
        return True
    return Check(bulk, lambda value: bulk([value]))


_TEMPORAL = {"date-time": datetime.datetime, "date": datetime.date, "time": datetime.time}


def _format_check(fmt: str) -> Check:
    """msgspec's RFC 3339 parsers accept a subset of what the validator's ISO 8601 rules accept (the tests
    hold them to it), so a column whose values they all accept is valid; otherwise each value is asked."""
    many = list[Optional[_TEMPORAL[fmt]]]
    func = FORMATS.checkers[fmt][0]

    def bulk(values: list) -> bool:
        return _converts(values, many)

    def single(value: object) -> bool:
        try:
            return bool(func(value))
        except ValueError:
            return False
    return Check(bulk, single)


def _multiple_of_check(divisor: int | float) -> Check:
    """A divisor written as a power of ten (0.01) is checked by rounding: a float equal to itself rounded to k
    places is written with at most k decimals, so its decimal remainder is zero while the quotient fits the
    decimal context (bounded below). Any other divisor, or a value that fails, is checked in decimal."""
    exact = Decimal(repr(divisor))
    places = -exact.adjusted() if exact == Decimal(1).scaleb(exact.adjusted()) else None

    def single(value: object) -> bool:
        return type(value) not in (int, float) or multiple_of_ok(value, divisor)

    if places is None or places < 0:
        return Check(lambda values: all(map(single, values)), single)
    limit = 10.0 ** (26 - places)

    def bulk(values: list) -> bool:
        return all(v is None or (-limit < v < limit and round(v, places) == v) for v in values)
    return Check(bulk, single)


def nameable(prop: str) -> bool:
    """Whether a record key can name a field of the typed decoder."""
    return not prop.startswith(PLACEHOLDER) and not _UNSAFE_NAME & set(prop)


def record_decoder(schema: dict, props: list[str | None], *, deleted_at: int | None,
                   undeclared: tuple[str, ...] = ()) -> RecordDecoder | None:
    """The typed decoder for records of ``schema`` loaded into columns whose properties are ``props`` (None for
    a column without one), or None when the schema is outside the subset. ``deleted_at`` is the index of the
    ``_sdc_deleted_at`` column, which takes the record's own ``_sdc_deleted_at`` value (any type) when
    metadata columns are on. ``undeclared``: record keys the schema does not declare that the decoder takes
    anyway, each as a raw JSON value (None when absent) after the columns' values; any other undeclared key
    makes it refuse the line."""
    try:
        return _record_decoder(schema, props, deleted_at, undeclared)
    except (Unsupported, TypeError, ValueError, NotImplementedError):  # the last three: types msgspec refuses
        return None


def _record_decoder(schema: dict, props: list[str | None], deleted_at: int | None,
                    undeclared: tuple[str, ...]) -> RecordDecoder:
    if schema.get("$schema", next(iter(_DRAFT4))) not in _DRAFT4:
        raise Unsupported("a draft other than 4")
    top = {k: v for k, v in schema.items() if k in _VALIDATION_KEYWORDS}
    if set(top) - {"type", "properties", "required", "additionalProperties"} \
            or top.get("type", "object") not in ("object", ["object"]) or top.get("additionalProperties", True) is not True:
        raise Unsupported("top-level keywords")
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    columns = set(p for p in props if p is not None)
    if not isinstance(properties, dict) or set(properties) != columns or not isinstance(required, list) \
            or not set(required) <= columns or any(p.startswith(PLACEHOLDER) or _UNSAFE_NAME & set(p) for p in columns):
        raise Unsupported("properties that are not the table's columns")
    if deleted_at is not None and "_sdc_deleted_at" in properties:
        raise Unsupported("a property named like a metadata column")
    fields, rename, checks = [], {}, []
    for i, prop in enumerate(props):
        name = f"f{i}"
        if prop is None:
            if i == deleted_at:
                fields.append((name, Any, None))
                rename[name] = "_sdc_deleted_at"
            else:
                fields.append((name, None, None))  # a key by this name can only be null: else the general path
                rename[name] = f"{PLACEHOLDER}{i}"
            continue
        p = properties[prop]
        typ = _types(p, nested=False)
        if not _fully_typed(typ):
            # Decoded as it comes (a struct would drop keys it does not name) and checked after, with
            # whatever integers it holds within 64 bits (orjson reads longer ones as floats, msgspec does not).
            # A missing key reads as null: where null is refused, such a record goes to the general path.
            checks.append((i, _json_check(None if typ is Any else typ)))
            typ = Any
        if "multipleOf" in p:
            divisor = p["multipleOf"]
            if isinstance(divisor, bool) or not isinstance(divisor, (int, float)) or divisor <= 0 \
                    or not set(p["type"] if isinstance(p["type"], list) else [p["type"]]) <= {"null", "integer", "number"}:
                raise Unsupported(f"multipleOf {divisor!r}")
            checks.append((i, _multiple_of_check(divisor)))
        if p.get("format") in _CHECKED_FORMATS:
            checks.append((i, _format_check(p["format"])))
        fields.append((name, typ) if prop in required else (name, typ, None))
        rename[name] = prop
    taken = set(rename.values())
    for i, prop in enumerate(undeclared):
        if prop in taken or not nameable(prop):
            raise Unsupported(f"undeclared key {prop!r}")
        fields.append((f"u{i}", msgspec.Raw, None))
        rename[f"u{i}"] = prop
    record = msgspec.defstruct("Record", fields, kw_only=True, rename=rename, forbid_unknown_fields=True)
    message = msgspec.defstruct("Message", [("type", Literal["RECORD"]), ("stream", str), ("record", record),
                                            ("time_extracted", Any, None), ("version", None, None)], kw_only=True)
    return RecordDecoder(msgspec.json.Decoder(message).decode, tuple(checks))
