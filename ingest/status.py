"""`singer-ingest status`: the runs in Redis, their streams, owners, backlog and last committed STATE."""

from __future__ import annotations

import time

import orjson
import redis

from . import wire
from .wire import RunKeys


def run_status(conn: redis.Redis, run_id: str) -> dict | None:
    keys = RunKeys(run_id)
    meta = conn.hgetall(keys.meta)
    if not meta:
        return None
    streams = {int(v): k.decode() for k, v in conn.hgetall(keys.streams).items()}
    pipe = conn.pipeline(transaction=False)
    pipe.hgetall(keys.sent)
    pipe.hgetall(keys.committed)
    pipe.hgetall(keys.rows)
    pipe.hgetall(keys.undeclared)
    pipe.hgetall(keys.dead_letters)
    pipe.get(keys.sent_bytes)
    pipe.get(keys.acked_bytes)
    pipe.get(keys.state)
    pipe.zrangebyscore(keys.members, int(time.time() * 1000), "+inf")
    for sid in sorted(streams):
        pipe.get(keys.lease(sid))
        pipe.xlen(keys.data(sid))
    sent, committed, rows, undeclared, dead, sent_bytes, acked_bytes, state, members, *per_stream = pipe.execute()
    undeclared_records, undeclared_props = wire.decode_undeclared(undeclared)
    out_streams = []
    for n, sid in enumerate(sorted(streams)):
        lease, entries = per_stream[2 * n], per_stream[2 * n + 1]
        owner = lease.decode().rsplit("|", 1)[0] if lease else None
        out_streams.append({
            "stream": streams[sid],
            "sent_up_to_line": int(sent.get(str(sid).encode(), 0)),
            "committed_up_to_line": int(committed.get(str(sid).encode(), 0)),
            "rows_committed": int(rows.get(str(sid).encode(), 0)),
            "records_with_undeclared_properties": undeclared_records.get(sid, 0),
            "undeclared_properties": undeclared_props.get(sid, []),
            "dead_letters": int(dead.get(str(sid).encode(), 0)),
            "entries_in_redis": entries,
            "owner": owner,
            "owner_host": owner.split(":", 1)[0] if owner else None,
        })
    return {
        "run_id": run_id,
        "status": meta.get(b"status", b"").decode(),
        "created_at": float(meta.get(b"created_at", b"0")),
        "feeder_host": meta.get(b"feeder_host", b"").decode() or None,
        "error": meta[b"error"].decode() if b"error" in meta else None,
        "backlog_bytes": int(sent_bytes or 0) - int(acked_bytes or 0),
        "workers": [m.decode() for m in members],
        "streams": out_streams,
        "last_committed_state": orjson.loads(state) if state else None,
    }


def all_runs(conn: redis.Redis, limit: int = 20) -> list[dict]:
    ids = [r.decode() for r in conn.zrevrange(wire.RUNS, 0, limit - 1)]
    return [s for s in (run_status(conn, r) for r in ids) if s is not None]


def render(runs: list[dict]) -> str:
    if not runs:
        return "no runs in this Redis\n"
    out = []
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"]))
        out.append(f"run {r['run_id']}: {r['status']}, started {started} UTC on {r['feeder_host']}, "
                   f"backlog {r['backlog_bytes'] / 1e6:.1f} MB, {len(r['workers'])} live worker(s)")
        if r["error"]:
            out.append(f"  error: {r['error']}")
        out.append(f"  {'stream':24s} {'rows':>10s} {'dead':>6s} {'committed':>10s} {'sent':>10s} {'entries':>8s}  "
                   f"owner")
        for s in r["streams"]:
            out.append(f"  {s['stream'][:24]:24s} {s['rows_committed']:>10,} {s['dead_letters']:>6,} "
                       f"{s['committed_up_to_line']:>10,} {s['sent_up_to_line']:>10,} {s['entries_in_redis']:>8,}  "
                       f"{s['owner'] or '-'}")
        state = orjson.dumps(r["last_committed_state"]).decode() if r["last_committed_state"] is not None else "-"
        out.append(f"  last committed STATE: {state[:200]}")
    return "\n".join(out) + "\n"
