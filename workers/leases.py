"""Stream ownership: a lease in Redis with a TTL, renewed while the worker lives.

The lease value is ``<member id>|<fencing token>``. The fencing token comes from a per-run counter and
grows with every claim; the destination stores it with the stream's offset, so a worker whose lease
expired cannot commit after another worker took the stream over.
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

    def release(self, lease: Lease) -> None:
        self._release(keys=[self.keys.lease(lease.sid)], args=[lease.token])

    def holders(self, sids: list[int]) -> dict[int, bytes | None]:
        if not sids:
            return {}
        values = self.redis.mget([self.keys.lease(s) for s in sids])
        return dict(zip(sids, values))
