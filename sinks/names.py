"""Identifier normalisation, the same for every destination.

Rules, applied in order to a stream or property name:
1. Case folded (``Straße`` -> ``strasse``), then Unicode folded to ASCII (NFKD, combining marks
   dropped: ``Zürich`` -> ``zurich``).
2. Lower case.
3. Every run of characters other than ``a-z``, ``0-9`` and ``_`` becomes one ``_``; underscores of the name
   are kept (``_sdc_sequence`` and the ``parent__child`` columns of flattening stay as they are).
4. An empty result becomes ``_``; a result starting with a digit gets a leading ``_``.
5. A result longer than the destination's limit (bytes) is cut and ends in ``_`` plus the first 8 hex
   digits of the SHA-1 of the original name, so it stays stable from run to run.
Reserved words are kept: every identifier is quoted by the destination, never formatted into SQL.
Two names of one table that end up the same are told apart by the same hash suffix, applied to all
but the first in sorted order, and reported in the log.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata

logger = logging.getLogger(__name__)

_BAD = re.compile(r"[^a-z0-9_]+")


def _suffix(original: str) -> str:
    return "_" + hashlib.sha1(original.encode("utf-8")).hexdigest()[:8]


def normalise(name: str, max_bytes: int = 63) -> str:
    folded = unicodedata.normalize("NFKD", name.casefold())
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    out = _BAD.sub("_", folded.lower())
    if out != "_" and out.endswith("_") and not name.endswith("_"):
        out = out.rstrip("_") or "_"
    if not out:
        out = "_"
    if out[0].isdigit():
        out = "_" + out
    if len(out.encode()) > max_bytes:
        out = out[: max_bytes - 9] + _suffix(name)
    return out


def normalise_all(names: list[str], max_bytes: int = 63, context: str = "") -> dict[str, str]:
    """Map each name to a distinct identifier; collisions get a stable hash suffix and are logged."""
    mapping: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in sorted(names):
        ident = normalise(name, max_bytes)
        if ident in taken:
            first = taken[ident]
            ident = ident[: max_bytes - 9] + _suffix(name)
            logger.warning("%s: names %r and %r both normalise to %r; %r is stored as %r",
                           context or "identifiers", first, name, normalise(name, max_bytes), name, ident)
        taken[ident] = name
        mapping[name] = ident
    return mapping
