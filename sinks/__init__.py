"""Destinations behind one interface (``sinks.base.Destination``), found through the kit (``sinks.kit``).

One module or folder per destination; ``sinks/base.py`` holds the contract and how each class of store keeps
the product's rules.
"""

from __future__ import annotations

from ingest.config import ConnectionSettings, RunSettings

from . import kit
from .base import Destination


def open_destination(run: RunSettings, connection: ConnectionSettings, *, embedded: bool) -> Destination:
    """Open the destination a run names, with the worker's own connection settings."""
    return kit.get(run.destination).open(run, connection, embedded=embedded)
