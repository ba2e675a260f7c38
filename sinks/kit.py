"""The destination kit: how destinations are declared, found and opened.

A destination is one module (or folder) under ``sinks/`` with a ``DESTINATION = DestinationPlugin(...)``
declaration at its top: its name, the class of store it is (below), its settings (declared once: ``--about``,
the README's settings table, the Meltano definition and the config checks all read them from here), the pip
extra holding its driver, and the factory that opens it. The declaration must not import the driver, so that
``--about`` and the config checks work where the driver is not installed; ``open`` imports it, and a missing
driver is a ``ConfigError`` naming the extra to install.

Destinations are found through the entry-point group ``singer_ingest.destinations`` (``pyproject.toml``
registers the built-in ones there too), so a third-party package adds one with::

    [project.entry-points."singer_ingest.destinations"]
    mystore = "singer_ingest_mystore:DESTINATION"

How each class of store keeps the product's rules (DESIGN.md: nothing lost, nothing doubled, STATE never
ahead of the data, a stale owner fenced out) is written down in ``sinks/base.py``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Callable

from ingest.errors import ConfigError

if TYPE_CHECKING:
    from ingest.config import ConnectionSettings, RunSettings, Setting

    from .base import Destination

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "singer_ingest.destinations"

# The classes of store (sinks/base.py says how each keeps the rules).
TRANSACTIONAL = "transactional"   # rows, offset and fencing token in one transaction
ATOMIC_COMMIT = "atomic-commit"   # the store's atomic commit carries the offset and fencing token with the rows
IDEMPOTENT = "idempotent"         # ids derived from keys or sequence: a replay rewrites the same documents
EXACTNESS = (TRANSACTIONAL, ATOMIC_COMMIT, IDEMPOTENT)


@dataclass(frozen=True)
class DestinationPlugin:
    name: str
    exactness: str
    description: str
    factory: str                         # "module:callable(run, connection, *, embedded) -> Destination"
    settings: tuple["Setting", ...] = ()
    extra: str | None = None             # pip extra of singer-ingest that installs the driver
    requires: tuple[str, ...] = ()       # top-level modules of the driver, checked before ``factory`` is imported
    target_setting: str | None = None    # the setting that says where rows go, shown in the run summary

    def __post_init__(self) -> None:
        if self.exactness not in EXACTNESS:
            raise ValueError(f"destination {self.name!r}: exactness must be one of {EXACTNESS}, got {self.exactness!r}")
        for s in self.settings:
            if s.scope not in ("run", "worker"):
                raise ValueError(f"destination {self.name!r}: setting {s.name!r} must be run- or worker-scoped")
            if s.secret and s.scope == "run":
                raise ValueError(f"destination {self.name!r}: secret setting {s.name!r} would travel through "
                                 f"Redis with the run; make it worker-scoped")

    def install_hint(self) -> str:
        return f"pip install 'singer-ingest[{self.extra}]'" if self.extra else "reinstall singer-ingest"

    def _factory(self) -> Callable[..., "Destination"]:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"destination {self.name!r} needs the Python package {', '.join(missing)}, which is "
                              f"not installed where this runs; install it with: {self.install_hint()}")
        module, _, attr = self.factory.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise ConfigError(f"destination {self.name!r} cannot load its driver ({exc}); install it with: "
                              f"{self.install_hint()}") from None

    def check_installed(self) -> None:
        """Raise ConfigError naming the extra to install when the driver is missing."""
        self._factory()

    def open(self, run: "RunSettings", connection: "ConnectionSettings", *, embedded: bool) -> "Destination":
        return self._factory()(run, connection, embedded=embedded)


@functools.lru_cache(maxsize=None)
def plugins() -> dict[str, DestinationPlugin]:
    """Every registered destination by name: the built-in ones first, then third-party ones by name."""
    found: dict[str, DestinationPlugin] = {}
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (not ep.value.startswith("sinks."), ep.name))
    for ep in eps:
        if ep.name in found:
            continue  # the same distribution seen twice on sys.path (an editable install beside a built one)
        try:
            plugin = ep.load()
        except ImportError as exc:
            logger.warning("destination plugin %s (%s) cannot be loaded and is left out: %s", ep.name, ep.value, exc)
            continue
        if not isinstance(plugin, DestinationPlugin) or plugin.name != ep.name:
            raise ConfigError(f"entry point {ep.name} = {ep.value} in group {ENTRY_POINT_GROUP} must be a "
                              f"sinks.kit.DestinationPlugin named {ep.name!r}")
        found[ep.name] = plugin
    if not found:
        raise ConfigError(f"no destinations are registered (entry-point group {ENTRY_POINT_GROUP}): singer-ingest "
                          f"is not installed in this Python; install it with pip install singer-ingest")
    return found


def get(name: str) -> DestinationPlugin:
    known = plugins()
    if name not in known:
        raise ConfigError(f"unknown destination {name!r}; registered destinations: {', '.join(known)} (a "
                          f"third-party destination registers itself in the entry-point group {ENTRY_POINT_GROUP})")
    return known[name]
