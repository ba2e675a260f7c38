"""Record validation against the stream's JSON schema.

Draft 4 by default (as singer-sdk), or the draft named by the schema's ``$schema``. Two adjustments
make validation fit tap output:
- ``multipleOf`` is checked in decimal arithmetic, so 19.99 is a multiple of 0.01 (float rounding is
  not an input error).
- ``date-time``, ``date`` and ``time`` formats are checked (ISO 8601), because those columns are
  loaded as temporal types; other formats are not enforced.

Speed: jsonschema-rs (Rust) answers first. Its verdict "valid" is final; when it says "invalid" (it is
stricter on formats: RFC 3339 date-times need a time zone, e-mail addresses are checked), the Python
``jsonschema`` validator with the rules above decides and gives the error message. Before either, most
RECORD lines are decoded and checked by ``typed.py``, which accepts only what these rules accept and
hands every other line to them.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal, InvalidOperation
from typing import Callable

import jsonschema
import jsonschema_rs
from jsonschema import FormatChecker, validators
from jsonschema.exceptions import ValidationError, best_match

from ingest.errors import InputError

FORMATS = FormatChecker(formats=())


# The extended ISO 8601 forms every destination reads (Python's fromisoformat also takes basic forms such as
# 20240814 and week dates, which the databases refuse); fromisoformat then checks the values' ranges.
_TIME = r"\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}(:?\d{2})?)?"
_DATE_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_TIME_TEXT = re.compile(_TIME + r"\Z")
_DATETIME_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]" + _TIME + r"\Z")


@FORMATS.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _DATETIME_TEXT.match(value):
        raise ValueError("not an ISO 8601 date-time (YYYY-MM-DDTHH:MM:SS with an optional offset)")
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    dt.datetime.fromisoformat(text)
    return True


@FORMATS.checks("date", raises=ValueError)
def _is_date(value: object) -> bool:
    if isinstance(value, str):
        if not _DATE_TEXT.match(value):
            raise ValueError("not an ISO 8601 date (YYYY-MM-DD)")
        dt.date.fromisoformat(value)
    return True


@FORMATS.checks("time", raises=ValueError)
def _is_time(value: object) -> bool:
    if isinstance(value, str):
        if not _TIME_TEXT.match(value):
            raise ValueError("not an ISO 8601 time (HH:MM:SS with an optional offset)")
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        dt.time.fromisoformat(text)
    return True


def multiple_of_ok(instance: int | float, divisor: int | float) -> bool:
    """``multipleOf`` in decimal arithmetic, as written in the JSON."""
    try:
        return Decimal(repr(instance)) % Decimal(repr(divisor)) == 0
    except (InvalidOperation, ValueError):
        return False


def _decimal_multiple_of(validator, divisor, instance, schema):
    if not validator.is_type(instance, "number") or isinstance(instance, bool):
        return
    if not multiple_of_ok(instance, divisor):
        yield ValidationError(f"{instance!r} is not a multiple of {divisor!r}")


def _validator_class(schema: dict):
    base = validators.validator_for(schema, default=jsonschema.Draft4Validator)
    return validators.extend(base, {"multipleOf": _decimal_multiple_of})


def check_schema(schema: dict, *, stream: str, line: int) -> None:
    cls = validators.validator_for(schema, default=jsonschema.Draft4Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(top)"
        raise InputError(f"SCHEMA is not a valid JSON schema at {where}: {exc.message}", stream=stream, line=line,
                         hint="Fix the tap's schema") from None


def _fast_validator(schema: dict):
    try:
        if "$schema" in schema:
            return jsonschema_rs.validator_for(schema, validate_formats=True)
        return jsonschema_rs.Draft4Validator(schema, validate_formats=True)
    except (jsonschema_rs.ValidationError, ValueError, TypeError, jsonschema_rs.ReferencingError):
        return None  # a schema jsonschema-rs cannot compile: the Python validator alone decides


def record_validator(schema: dict) -> Callable[[dict, str, int], None]:
    """Build a function that raises InputError(stream, line) for a record failing ``schema``."""
    validator = _validator_class(schema)(schema, format_checker=FORMATS)
    is_valid = validator.is_valid
    fast = _fast_validator(schema)
    fast_is_valid = fast.is_valid if fast is not None else (lambda record: False)

    def validate(record: dict, stream: str, line: int) -> None:
        if fast_is_valid(record) or is_valid(record):
            return
        error = best_match(validator.iter_errors(record))
        where = "/".join(str(p) for p in error.absolute_path) or "(record)"
        raise InputError(f"record fails its JSON schema at {where}: {error.message}", stream=stream, line=line,
                         hint="Fix the tap, or set validate_records to false to load it unvalidated")

    return validate
