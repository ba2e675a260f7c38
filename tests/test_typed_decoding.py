"""The typed decoding of RECORD lines (workers/typed.py) must never accept what the Draft 4 validator refuses,
and must give the values orjson gives."""

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from workers.typed import _format_check, _multiple_of_check, record_decoder
from workers.validation import FORMATS, _validator_class

GEN = Path(__file__).resolve().parents[2] / "shared" / "bench" / "gen_singer.py"


def _python_validator(schema):
    return _validator_class(schema)(schema, format_checker=FORMATS)


def _typed_row(decoder, record, stream="s"):
    """The row the typed decoder makes of a record line, or None where it hands the line on."""
    import msgspec

    line = json.dumps({"type": "RECORD", "stream": stream, "record": record}).encode()
    try:
        msg = decoder.decode(line)
    except msgspec.MsgspecError:
        return None
    row = list(msgspec.structs.astuple(msg.record))
    if decoder.first_invalid([row], 0) is not None:
        return None
    return row


def _same(a, b):
    """Equal, and of the same JSON types all the way down (1 is not 1.0, True is not 1)."""
    return json.dumps(a) == json.dumps(b)


# -- schemas and records ---------------------------------------------------------------------------

KINDS = ["null", "string", "integer", "number", "boolean", "object", "array"]
DATES = ["2024-08-14T07:58:40+00:00", "2024-08-14t07:58:40z", "2024-08-14 07:58:40Z", "2024-08-14T07:58:40",
         "2024-08-14T07:58:40.1234567Z", "2024-08-14T07:58:60Z", "2024-08-14T24:00:00Z", "2024-02-30T00:00:00Z",
         "2024-08-14T07:58Z", "2024-W01-1T00:00:00", "20240814T075840Z", "2024-08-14T07:58:40+0530",
         "2024-08-14T07:58:40.1+05", "2024-08-14", "20240814", "2024-W01-1", "07:58:40", "07:58:40Z", "07:58",
         "0758", "07:58:40.5+05:30", "24:00", "2024-08-14T07:58:40 +00:00", "2024-13-01", "0000-01-01", ""]
names = st.sampled_from(["a", "b", "c d", "é"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-5, 5),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.5, 19.99, 1e300, 3.0, 0.3]),
                    st.text(max_size=6), st.text(alphabet="ab1", max_size=6), st.sampled_from(DATES),
                    st.sampled_from(["a", "b", "c", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(names, inner, max_size=3)), max_leaves=6)


@st.composite
def prop_schemas(draw, depth=0):
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True))
    p = {"type": kinds[0] if len(kinds) == 1 and draw(st.booleans()) else kinds}
    for _ in range(draw(st.integers(0, 2) if depth else st.integers(1, 2))):
        extra = draw(st.sampled_from(["maxLength", "minLength", "pattern", "minimum", "maximum", "enum", "format",
                                      "multipleOf", "items", "properties"]))
        if extra in ("maxLength", "minLength"):
            p[extra] = draw(st.integers(0, 4))
        elif extra == "pattern":
            p[extra] = draw(st.sampled_from(["^a", "b$", "[0-9]"]))
        elif extra in ("minimum", "maximum"):
            p[extra] = draw(st.sampled_from([0, 1, -2, 0.5, 2**65]))
            if draw(st.booleans()):
                p["exclusiveM" + extra[1:]] = draw(st.booleans())
        elif extra == "enum":
            p[extra] = draw(st.lists(st.sampled_from([None, "a", "b", 1, 0, 2**65]), min_size=1, max_size=3))
        elif extra == "format":
            p[extra] = draw(st.sampled_from(["date-time", "date", "time", "email"]))
        elif extra == "multipleOf":
            p[extra] = draw(st.sampled_from([0.01, 0.5, 3, 1, 0.1, 10]))
        elif extra == "items" and depth < 2:
            p[extra] = draw(prop_schemas(depth + 1))
        elif extra == "properties" and depth < 2:
            p[extra] = draw(st.dictionaries(names, prop_schemas(depth + 1), max_size=2))
            if p[extra] and draw(st.booleans()):
                p["required"] = [next(iter(p[extra]))]
    return p


def values_for(p):
    """Values near what a property schema allows: of its types, around its bounds, and now and then anything."""
    by_kind = {"null": st.none(), "boolean": st.booleans(),
               "string": st.one_of(st.text(alphabet="ab1", max_size=6), st.sampled_from(DATES)),
               "integer": st.one_of(st.integers(-4, 4), st.sampled_from([2**63, 2**64, -2**63 - 1, 2**65])),
               "number": st.one_of(st.integers(-4, 4), st.floats(-4, 4), st.sampled_from([0.5, 19.99, 0.3, 1e300])),
               "object": st.dictionaries(st.sampled_from([*(p.get("properties") or {}), "x"]),
                                         st.deferred(lambda: st.one_of(
                                             *[values_for(sub) for sub in (p.get("properties") or {}).values()],
                                             values)), max_size=3),
               "array": st.lists(values_for(p["items"]) if isinstance(p.get("items"), dict) else values, max_size=3)}
    kinds = p["type"] if isinstance(p["type"], list) else [p["type"]]
    return st.one_of(*[by_kind[k] for k in KINDS if k in kinds or k == "null"], values)


@st.composite
def schemas_and_records(draw):
    props = draw(st.dictionaries(names, prop_schemas(), min_size=1, max_size=2))
    schema = {"type": "object", "properties": props}
    if draw(st.booleans()):
        schema["required"] = draw(st.lists(st.sampled_from(list(props)), max_size=2, unique=True))
    record = st.fixed_dictionaries({}, optional={**{k: values_for(p) for k, p in props.items()},
                                                 "_sdc_deleted_at": values, "x": values})
    records = draw(st.lists(record, min_size=1, max_size=8))
    return schema, records


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas_and_records(), st.booleans())
@example(({"type": "object", "properties": {"a": {"type": ["array"], "items": {"type": ["object"]}}}}, [{"a": {}}]),
         False)
def test_what_the_typed_decoder_accepts_the_validator_accepts_with_the_same_values(case, metadata):
    schema, records = case
    props = list(schema["properties"]) + ([None, None] if metadata else [None])
    deleted_at = len(props) - 1 if metadata else None
    decoder = record_decoder(schema, props, deleted_at=deleted_at)
    if decoder is None:
        return
    validator = _python_validator(schema)
    for record in records:
        row = _typed_row(decoder, record)
        if row is None:
            continue
        record = orjson.loads(json.dumps(record))  # as the general path reads it
        assert validator.is_valid(record), (schema, record)
        expected = [record.get(p) if p is not None else None for p in props]
        if metadata:  # the sink keeps the record's own _sdc_deleted_at only where it is a string
            deleted = record.get("_sdc_deleted_at")
            expected[deleted_at] = deleted if isinstance(deleted, str) else None
            row[deleted_at] = row[deleted_at] if isinstance(row[deleted_at], str) else None
        assert _same(row, expected), (schema, record, row)
        assert "x" not in record  # a key the schema does not declare: refused, for the general path to report
    # Built to read past "x", the decoder gives the same columns and, after them, "x" as raw JSON when present.
    reading_x = record_decoder(schema, props, deleted_at=deleted_at, undeclared=("x",))
    assert reading_x is not None
    for record in records:
        row = _typed_row(reading_x, record)
        if row is None or "x" in schema["properties"]:
            continue
        assert (row.pop() is not None) == ("x" in record)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(DATES), st.text(alphabet="0123456789-:T+Z. tzW", max_size=30)), max_size=6),
       st.sampled_from(["date-time", "date", "time"]))
def test_a_column_of_temporal_strings_the_bulk_check_accepts_is_valid_one_by_one(texts, fmt):
    check = _format_check(fmt)
    if check.bulk(texts):
        assert all(check.single(t) for t in texts), texts


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(-2**100, 2**100), st.floats(allow_nan=False, allow_infinity=False),
                          st.decimals(places=3, min_value=-10**6, max_value=10**6).map(float)), max_size=6),
       st.sampled_from([0.01, 0.1, 1, 0.001, 10, 0.5, 3, 2.5]))
def test_a_column_the_multiple_of_bulk_check_accepts_is_valid_one_by_one(numbers, divisor):
    check = _multiple_of_check(divisor)
    if check.bulk(numbers):
        assert all(check.single(v) for v in numbers), numbers


@pytest.mark.parametrize(("prop", "valid", "invalid"), [
    ({"type": "string", "maxLength": 2}, ["ab", "é😀"], ["abc"]),
    ({"type": "string", "minLength": 2}, ["ab"], ["a", None]),
    ({"type": "string", "pattern": "b$"}, ["ab", "b"], ["ba"]),
    ({"type": ["null", "integer"], "minimum": 1, "exclusiveMinimum": True}, [2, None], [1, 1.5, "2", True]),
    ({"type": "number", "maximum": 1.5}, [1.5, -3, 1], [1.6, 2]),
    ({"type": "number", "maximum": 1.5, "exclusiveMaximum": True}, [1.4], [1.5]),
    ({"type": ["null", "string"], "enum": [None, "a", 1]}, ["a", None], ["b", 1]),
    ({"enum": ["a", 1], "type": ["string", "integer"]}, ["a", 1], ["b", 2, True]),
    ({"type": "integer"}, [0, -2**63, 2**63 - 1], [1.5, True, "1"]),
    ({"type": "boolean"}, [True, False], [0, 1, "true", None]),
    ({"type": ["null", "number"], "multipleOf": 0.01}, [19.99, 3, 0.3, None], [19.999, 1e300]),
    ({"type": "integer", "multipleOf": 3}, [9, -3, 0], [10]),
    ({"type": "string", "format": "date"}, ["2024-08-14"], ["2024-02-30", "14.08.2024"]),
    ({"type": ["null", "array"], "items": {"type": "string"}}, [["a"], [], None], [[1], "a", {"a": 1}]),
    ({"type": ["null", "object"], "properties": {"k": {"type": "integer"}}, "required": ["k"]},
     [{"k": 1}, {"k": 1, "extra": [1]}, None], [{}, {"k": "1"}, [1]]),
    ({"type": "array", "items": {"type": "object"}}, [[{"a": 1}], []], [{}, [1], None]),
    ({"type": ["null", "array"], "items": {"type": "object"}}, [[{}], None], [{"a": [1]}, [[]]]),
    ({"type": ["null", "array"], "items": {"type": "object", "properties": {"q": {"type": "integer"}}}},
     [[{"q": 1}, {"z": 2}], None], [[{"q": 1.5}], [1]]),
    ({}, [1, "a", None, {"a": [1]}], []),
])
def test_each_keyword_of_the_subset_accepts_and_refuses_as_the_validator(prop, valid, invalid):
    schema = {"type": "object", "properties": {"v": prop}, "required": ["v"]}
    decoder = record_decoder(schema, ["v"], deleted_at=None)
    validator = _python_validator(schema)
    assert decoder is not None
    for value in valid:
        assert validator.is_valid({"v": value}), value
        assert _same(_typed_row(decoder, {"v": value}), [value]), value
    for value in invalid:
        assert not validator.is_valid({"v": value}), value
        assert _typed_row(decoder, {"v": value}) is None, value


def test_the_typed_decoder_hands_on_what_the_validator_alone_accepts():
    """Values msgspec refuses but Draft 4 accepts (a date-time without seconds, a large float multiple of 0.01)
    are not refused: the decoder hands them to the general path."""
    schema = {"type": "object", "properties": {"ts": {"type": "string", "format": "date-time"},
                                               "amount": {"type": ["null", "number"], "multipleOf": 0.01}}}
    decoder = record_decoder(schema, ["ts", "amount"], deleted_at=None)
    assert decoder is not None
    validator = _python_validator(schema)
    ok = {"ts": "2024-08-14T07:58:40Z", "amount": 19.99}
    assert _typed_row(decoder, ok) == ["2024-08-14T07:58:40Z", 19.99]
    for handed_on in ({"ts": "2024-08-14T07:58Z", "amount": 1}, {"ts": "2024-08-14 07:58:40", "amount": 1e22}):
        assert validator.is_valid(handed_on)
        row = _typed_row(decoder, handed_on)  # refused by msgspec's parsers, taken by the exact checks, or handed on
        assert row is None or _same(row, [handed_on["ts"], handed_on["amount"]]), row
    for invalid in ({"ts": "2024-02-30T00:00:00Z"}, {"ts": "2024-08-14"}, {"ts": "x", "amount": 19.999},
                    {"amount": 19.999}, {"amount": 1e300}, {"amount": True}, {"ts": None}):
        assert not validator.is_valid(invalid)
        assert _typed_row(decoder, invalid) is None, invalid


@pytest.mark.parametrize("schema", [
    {"properties": {"a": {"$ref": "#/definitions/x"}}, "definitions": {"x": {"type": "string"}}},
    {"properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
    {"properties": {"a": {"type": "string"}}, "additionalProperties": False},
    {"properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}, "additionalProperties": False}}},
    {"properties": {"a": {"type": "string"}}, "$schema": "https://json-schema.org/draft/2020-12/schema"},
    {"properties": {"a": {"type": "array", "items": [{"type": "string"}]}}},
    {"properties": {"a": {"type": "array", "uniqueItems": True}}},
    {"properties": {"a": {"type": "string"}}, "required": ["b"]},
    {"properties": {"a": {"type": "object", "properties": {"b": {"type": "string", "format": "date"}}}}},
    {"properties": {"a": {"type": "string"}}, "minProperties": 1},
])
def test_schemas_outside_the_subset_stay_on_the_general_path(schema):
    assert record_decoder(schema, ["a"], deleted_at=None) is None


def test_the_generated_streams_are_decoded_typed_with_the_rows_orjson_gives(tmp_path):
    data = subprocess.run([sys.executable, str(GEN), "--records", "3000"], check=True, capture_output=True).stdout
    schemas, seen = {}, {}
    for line in data.splitlines():
        msg = orjson.loads(line)
        if msg["type"] == "SCHEMA":
            props = list(msg["schema"]["properties"])
            schemas[msg["stream"]] = (record_decoder(msg["schema"], props, deleted_at=None), props)
        elif msg["type"] == "RECORD":
            decoder, props = schemas[msg["stream"]]
            assert decoder is not None, msg["stream"]
            row = decoder.decode(line)
            import msgspec

            got = list(msgspec.structs.astuple(row.record))
            assert decoder.first_invalid([got], 0) is None
            assert _same(got, [msg["record"].get(p) for p in props])
            seen[msg["stream"]] = seen.get(msg["stream"], 0) + 1
    assert set(seen) == {"users", "events", "orders", "wide_metrics"}


def test_temporal_values_keep_their_text():
    schema = {"properties": {"d": {"type": "string", "format": "date"}, "t": {"type": "string", "format": "time"}}}
    decoder = record_decoder(schema, ["d", "t"], deleted_at=None)
    assert _typed_row(decoder, {"d": "2024-08-14", "t": "07:58:40.123+02:00"}) == ["2024-08-14", "07:58:40.123+02:00"]


@pytest.mark.parametrize("prop", [{"type": ["null", "object"]}, {}, {"type": "array", "items": {"type": "number"}},
                                  {"type": ["null", "object"], "properties": {"k": {"type": "number"}}}])
def test_integers_beyond_64_bits_are_left_to_the_general_path_which_reads_them_as_orjson_does(prop):
    decoder = record_decoder({"properties": {"v": prop}}, ["v"], deleted_at=None)
    big, fits = 2**70, 2**63 - 1
    wrap = (lambda n: [n]) if prop.get("type") == "array" else (lambda n: {"k": n})
    assert _typed_row(decoder, {"v": wrap(big)}) is None
    assert _typed_row(decoder, {"v": wrap(-big)}) is None
    assert _same(_typed_row(decoder, {"v": wrap(fits)}), [wrap(fits)])


def test_undeclared_keys_are_refused_unless_named_and_then_read_raw_after_the_columns():
    import msgspec

    nested = {"type": ["null", "object"], "properties": {"a": {"type": "integer"}}}
    schema = {"type": "object", "properties": {"id": {"type": "integer"}, "o": nested}}
    props = ["id", "o", None]
    strict = record_decoder(schema, props, deleted_at=2)
    assert _typed_row(strict, {"id": 1, "o": {"a": 1, "nested_extra": 2}, "_sdc_deleted_at": "x"}) is not None
    assert _typed_row(strict, {"id": 1, "zz": 2}) is None
    loose = record_decoder(schema, props, deleted_at=2, undeclared=("zz", "yy"))
    row = _typed_row(loose, {"id": 1, "zz": {"deep": [1]}})
    assert row[:3] == [1, None, None] and bytes(row[3]) == b'{"deep": [1]}' and row[4] is None
    assert isinstance(row[3], msgspec.Raw)
    assert _typed_row(loose, {"id": 1, "other": 2}) is None
    # A name no field can take, or one the schema declares, is not read past: the caller never asks for it.
    assert record_decoder(schema, props, deleted_at=2, undeclared=("id",)) is None
    assert record_decoder(schema, props, deleted_at=2, undeclared=('q"uote',)) is None
