"""Stream ownership: a lease in Redis with a TTL, renewed while the worker lives.

The lease value is ``<member id>|<fencing token>``. The fencing token comes from a per-run counter and
grows with every claim; the destination stores it with the stream's offset, so a worker whose lease
expired cannot commit after another worker took the stream over.

Reads are fenced too: a worker reads a stream's entries (XREADGROUP) only in a script that first checks
the lease is still its own. Otherwise a worker that has not yet noticed its lease expired could take
new entries into its pending list after another worker took the stream over and claimed the pending
entries, and the new owner would never see them.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from ingest.wire import RunKeys

# Renew only if the lease is still ours; returns 1 when renewed.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# For each (lease, stream) pair: XREADGROUP only while the lease is ours. Reply per pair: the entries
# (an empty list when none), or -1 when the lease is not ours.
# KEYS: lease_1, data_1, lease_2, data_2, ...  ARGV: group, consumer, count, token_1, id_1, token_2, id_2, ...
_READ = """
local out = {}
for i = 1, #KEYS, 2 do
  local n = (i + 1) / 2
  if redis.call('GET', KEYS[i]) == ARGV[2 + 2 * n] then
    local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[i + 1],
                         ARGV[3 + 2 * n])
    if not r or #r == 0 then
      out[n] = {}
    elseif type(r[1]) == 'table' then
      out[n] = r[1][2]  -- Redis: {{key, entries}}
    else
      out[n] = r[2]     -- fakeredis (embedded mode) answers {key, entries}
    end
  else
    out[n] = -1
  end
end
return out
"""
# Release only if the lease is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Lease:
    sid: int
    token: bytes
    fence: int


class Leases:
    def __init__(self, redis: Redis, keys: RunKeys, member_id: str, ttl_seconds: float):
        self.redis = redis
        self.keys = keys
        self.member_id = member_id
        self.ttl_ms = max(100, int(ttl_seconds * 1000))
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._read = redis.register_script(_READ)

    def try_claim(self, sid: int) -> Lease | None:
        key = self.keys.lease(sid)
        if self.redis.exists(key):
            return None
        fence = int(self.redis.incr(self.keys.fence))
        token = f"{self.member_id}|{fence}".encode()
        if not self.redis.set(key, token, nx=True, px=self.ttl_ms):
            return None
        return Lease(sid, token, fence)

    def renew(self, leases: list[Lease]) -> list[Lease]:
        """Renew every lease; return the ones that were lost."""
        if not leases:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for lease in leases:
            self._renew(keys=[self.keys.lease(lease.sid)], args=[lease.token, self.ttl_ms], client=pipe)
        results = pipe.execute()
        return [lease for lease, ok in zip(leases, results) if not ok]

    def read(self, group: str, wanted: list[tuple[Lease, str, bytes]], count: int) -> list[list | None]:
        """XREADGROUP each (lease, stream key, start id) while the lease is still this worker's; per stream,
        the entries as (id, fields) or None when the lease is no longer held."""
        if not wanted:
            return []
        keys: list[str] = []
        args: list = [group, self.member_id, count]
        for lease, data, start in wanted:
            keys += [self.keys.lease(lease.sid), data]
            args += [lease.token, start]
        out = []
        for reply in self._read(keys=keys, args=args):
            if not isinstance(reply, list):
                out.append(None)
            else:
                out.append([(entry_id, dict(zip(flat[::2], flat[1::2]))) for entry_id, flat in reply])
        return out

    def release(self, lease: Lease) -> None:
        self._release(keys=[self.keys.lease(lease.sid)], args=[lease.token])

    def holders(self, sids: list[int]) -> dict[int, bytes | None]:
        if not sids:
            return {}
        values = self.redis.mget([self.keys.lease(s) for s in sids])
        return dict(zip(sids, values))
