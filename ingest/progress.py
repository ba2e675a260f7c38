"""Progress of a run while it goes on: a live table on a terminal, a periodic log line elsewhere.

The feeder hands a :class:`Snapshot` to a reporter each time it polls the run; the reporter decides
how often to show it. Everything goes to stderr: stdout carries STATE lines only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import orjson

logger = logging.getLogger("ingest.progress")


@dataclass(frozen=True)
class Snapshot:
    run_id: str
    elapsed: float
    lines: int
    received: dict[str, int]         # RECORD messages read from the input, per stream
    loaded: dict[str, int]           # rows committed to the destination, per stream
    backlog_bytes: int
    live_workers: int
    state_line: int | None = None    # input line of the last STATE printed
    state: object = None


@dataclass
class _Rates:
    """Rows per second per stream, from the loaded counts of successive snapshots (smoothed)."""

    window: float = 5.0
    _last: tuple[float, dict[str, int]] | None = None
    rates: dict[str, float] = field(default_factory=dict)

    def update(self, at: float, loaded: dict[str, int]) -> dict[str, float]:
        if self._last is not None:
            then, before = self._last
            dt = at - then
            if dt > 0:
                weight = min(1.0, dt / self.window)
                for name, n in loaded.items():
                    now_rate = (n - before.get(name, 0)) / dt
                    self.rates[name] = self.rates.get(name, now_rate) * (1 - weight) + now_rate * weight
        self._last = (at, dict(loaded))
        return self.rates


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _state_text(snap: Snapshot, width: int) -> str:
    if snap.state_line is None:
        return "none yet"
    text = orjson.dumps(snap.state).decode()
    if len(text) > width:
        text = text[:width - 1] + "…"
    return f"input line {snap.state_line}: {text}"


class LogProgress:
    """One log line every ``interval`` seconds (with the figures as fields in JSON logs)."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self._next = clock() + interval
        self._rates = _Rates(window=interval)

    def update(self, snap: Snapshot) -> None:
        now = self.clock()
        rates = self._rates.update(now, snap.loaded)
        if now < self._next:
            return
        self._next = now + self.interval
        streams = ", ".join(f"{name} {snap.loaded.get(name, 0):,}/{n:,} ({rates.get(name, 0.0):,.0f}/s)"
                            for name, n in snap.received.items())
        logger.info("run %s: %.0f s, %d lines read; loaded/received %s; backlog %s; %d worker(s); last STATE %s",
                    snap.run_id, snap.elapsed, snap.lines, streams or "nothing yet", _mb(snap.backlog_bytes),
                    snap.live_workers, _state_text(snap, 120),
                    extra={"run": snap.run_id, "elapsed_seconds": round(snap.elapsed, 1), "lines": snap.lines,
                           "streams": {name: {"received": n, "loaded": snap.loaded.get(name, 0),
                                              "rows_per_second": round(rates.get(name, 0.0), 1)}
                                       for name, n in snap.received.items()},
                           "backlog_bytes": snap.backlog_bytes, "live_workers": snap.live_workers,
                           "state_line": snap.state_line})

    def close(self, final: Snapshot | None = None) -> None:
        """Nothing to tear down: the feeder's summary line follows."""


class LiveProgress:
    """A table on the terminal (rich), redrawn a few times a second; stays on screen when the run ends."""

    def __init__(self, console, refresh_seconds: float = 0.5, clock=time.monotonic):
        from rich.live import Live

        self.console = console
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self._next = 0.0
        self._rates = _Rates()
        self._live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False,
                          redirect_stderr=False)
        self._started = False
        self._last: Snapshot | None = None

    def update(self, snap: Snapshot) -> None:
        now = self.clock()
        self._last = snap
        if now < self._next:
            return
        self._next = now + self.refresh_seconds
        self._draw(snap, self._rates.update(now, snap.loaded))

    def _draw(self, snap: Snapshot, rates: dict[str, float]) -> None:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table()
        table.add_column("stream")
        table.add_column("received", justify="right")
        table.add_column("loaded", justify="right")
        table.add_column("rows/s", justify="right")
        for name, n in snap.received.items():
            table.add_row(name, f"{n:,}", f"{snap.loaded.get(name, 0):,}", f"{rates.get(name, 0.0):,.0f}")
        table.add_row("all", f"{sum(snap.received.values()):,}", f"{sum(snap.loaded.values()):,}",
                      f"{sum(rates.values()):,.0f}", style="bold")
        view = Group(
            Text(f"singer-ingest run {snap.run_id}: {snap.elapsed:,.0f} s, {snap.lines:,} lines read"),
            table,
            Text(f"backlog in Redis {_mb(snap.backlog_bytes)}, {snap.live_workers} worker(s)"),
            Text(f"last STATE {_state_text(snap, max(20, self.console.width - 30))}", overflow="ellipsis",
                 no_wrap=True))
        if not self._started:
            self._live.start()
            self._started = True
        self._live.update(view, refresh=True)

    def close(self, final: Snapshot | None = None) -> None:
        last = final or self._last
        if last is not None:  # the frame left on screen: rows/s averaged over the whole run
            self._draw(last, {name: n / last.elapsed for name, n in last.loaded.items()} if last.elapsed > 0
                       else self._rates.rates)
        if self._started:
            self._live.stop()
