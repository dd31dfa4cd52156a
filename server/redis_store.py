"""The session store and the job store on Redis, for several gateways behind one balancer: the
same calls and semantics as `store.MemoryStore` and `job_store.SqliteJobStore`
(tests/test_store.py runs one suite against each). Imported only when Redis is configured.

Keys, all under `prefix`; `{sid}` is also a Redis Cluster hash tag, so a session's keys share a
slot and its scripts touch one node:
    tok:{sid}        STRING  resume token (its presence means "registered")
    ring:{sid}       ZSET    score frame index, member the packed frame (_FRAME header + data)
    trimmed:{sid}    STRING  the last audio seq trimmed from the ring (absent: none)
    epoch:{sid}      STRING  INCR fencing epoch
    state:{sid}      HASH    the session's rebuildable state, one field per part
    queue            ZSET    score arrival number, member session id
    queue:arrival    STRING  INCR arrival counter
    job:<id>         HASH    one JobRecord, each field as JSON (None, int and float round-trip)
    jobs             ZSET    score created, member job id
    jobs:owner:<o>   ZSET    score created, member job id, one per owner
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import struct
from typing import cast

import redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT

from .store import RUNNING_TTL_S, JobRecord, RingFrame

# index, has_seq, seq, end_pts; the ring_trim script reads the same header with Lua's struct.
_FRAME = struct.Struct(">qBqq")

# Every per-session key: `forget` drops them all.
_SESSION_KINDS = ("tok", "ring", "trimmed", "epoch", "state")

# Append only to a registered session (a late writer must not bring back a forgotten ring),
# and only for the writer that holds its epoch (ARGV[3]; 0: unfenced), in one step.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
local fence = tonumber(ARGV[3])
if fence ~= 0 and tonumber(redis.call('GET', KEYS[3]) or '0') ~= fence then return 0 end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# Drop frames from the front while they end before ARGV[1], remembering the last audio seq. One
# script, so a frame appended meanwhile is neither lost nor trimmed out of order.
_TRIM = """
local keep = tonumber(ARGV[1])
while true do
    local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
    if not head then break end
    local _, has_seq, seq, end_pts = struct.unpack('>i8Bi8i8', head)
    if end_pts >= keep then break end
    redis.call('ZREM', KEYS[1], head)
    if has_seq == 1 then redis.call('SET', KEYS[2], string.format('%d', seq)) end
end
"""

# Admission across gateways, in one step: drop running entries nobody renewed, then move the
# session from the queue to the running set if it is first and there is room. Redis' clock.
_ADMIT = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', t)
if redis.call('ZRANGE', KEYS[1], 0, 0)[1] ~= ARGV[1] then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], t + tonumber(ARGV[3]), ARGV[1])
return 1
"""

_KEEP = """
local now = redis.call('TIME')
local until_ = tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], until_, ARGV[i]) end
"""

_RUNNING = """
local now = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now[1]) + tonumber(now[2]) / 1e6)
return redis.call('ZCARD', KEYS[1])
"""

# A session already waiting keeps its place.
_ENQUEUE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), ARGV[1])
end
"""

_SAVE_STATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
"""


def _pack(frame: RingFrame) -> bytes:
    seq = -1 if frame.seq is None else frame.seq
    head = _FRAME.pack(frame.index, frame.seq is not None, seq, frame.end_pts)
    return head + frame.data


def _unpack(member: bytes) -> RingFrame:
    index, has_seq, seq, end_pts = _FRAME.unpack_from(member)
    return RingFrame(index, seq if has_seq else None, end_pts, member[_FRAME.size :])


class RedisStore:
    """`store.SessionStore` on Redis. Thread-safe: redis-py's client takes a connection from
    its pool for each call."""

    shared = True  # other processes see what this one writes

    def __init__(self, url: str, prefix: str = "vibecast:") -> None:
        # Bytes in and out: ring frames and state blobs are binary.
        self._redis = redis.Redis.from_url(url, decode_responses=False)
        self._prefix = prefix
        self._queue = prefix + "queue"
        self._arrival = prefix + "queue:arrival"
        self._append = self._redis.register_script(_APPEND)
        self._trim = self._redis.register_script(_TRIM)
        self._enqueue = self._redis.register_script(_ENQUEUE)
        self._save_state = self._redis.register_script(_SAVE_STATE)
        self._running = prefix + "running"
        self._admit = self._redis.register_script(_ADMIT)
        self._keep = self._redis.register_script(_KEEP)
        self._count = self._redis.register_script(_RUNNING)

    def _key(self, kind: str, session_id: str) -> str:
        return f"{self._prefix}{kind}:{{{session_id}}}"

    def close(self) -> None:
        self._redis.close()

    def register(self, session_id: str, resume_token: str) -> None:
        # One transaction: an append between the reset and the token would be lost or kept.
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._key("tok", session_id), resume_token.encode())
        pipe.delete(
            self._key("ring", session_id),
            self._key("trimmed", session_id),
            self._key("state", session_id),
        )
        pipe.execute()

    def token_matches(self, session_id: str, resume_token: str) -> bool:
        known = cast(bytes | None, self._redis.get(self._key("tok", session_id)))
        # As bytes, like MemoryStore: compare_digest refuses str with non-ASCII characters.
        return known is not None and hmac.compare_digest(known, resume_token.encode())

    def forget(self, session_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(*(self._key(kind, session_id) for kind in _SESSION_KINDS))
        pipe.zrem(self._queue, session_id)
        pipe.zrem(self._running, session_id)
        pipe.execute()

    def ring_append(self, session_id: str, frame: RingFrame, fence: int = 0) -> bool:
        keys = [
            self._key("tok", session_id),
            self._key("ring", session_id),
            self._key("epoch", session_id),
        ]
        return bool(self._append(keys=keys, args=[frame.index, _pack(frame), fence]))

    def ring_after(self, session_id: str, last_seq: int) -> list[RingFrame] | None:
        # One transaction: the token, the trim mark and the frames as of the same moment.
        pipe = self._redis.pipeline(transaction=True)
        pipe.exists(self._key("tok", session_id))
        pipe.get(self._key("trimmed", session_id))
        pipe.zrange(self._key("ring", session_id), 0, -1)
        registered, trimmed_raw, members = pipe.execute()
        trimmed_seq = -1 if trimmed_raw is None else int(trimmed_raw)
        if not registered or last_seq < trimmed_seq:
            return None
        frames = [_unpack(m) for m in cast(list[bytes], members)]
        if last_seq < 0:
            return frames if trimmed_seq < 0 else None
        for i, f in enumerate(frames):
            if f.seq == last_seq:
                return frames[i + 1 :]
        # last_seq is not in the ring: it is either the last trimmed frame or not sent yet.
        return frames if last_seq == trimmed_seq else None

    def ring_last(self, session_id: str) -> RingFrame | None:
        members = cast(list[bytes], self._redis.zrange(self._key("ring", session_id), -1, -1))
        return _unpack(members[0]) if members else None

    def ring_trim(self, session_id: str, keep_from_pts: int) -> None:
        keys = [self._key("ring", session_id), self._key("trimmed", session_id)]
        self._trim(keys=keys, args=[keep_from_pts])

    def admit(self, session_id: str, capacity: int) -> bool:
        keys = [self._queue, self._running]
        return bool(self._admit(keys=keys, args=[session_id, capacity, RUNNING_TTL_S]))

    def keep_running(self, session_ids: list[str]) -> None:
        if session_ids:
            self._keep(keys=[self._running], args=[RUNNING_TTL_S, *session_ids])

    def release(self, session_id: str) -> None:
        self._redis.zrem(self._running, session_id)

    def running(self) -> int:
        return int(cast(int, self._count(keys=[self._running])))

    def enqueue(self, session_id: str) -> None:
        self._enqueue(keys=[self._queue, self._arrival], args=[session_id])

    def dequeue(self, session_id: str) -> None:
        self._redis.zrem(self._queue, session_id)

    def queue(self) -> list[str]:
        members = cast(list[bytes], self._redis.zrange(self._queue, 0, -1))
        return [m.decode() for m in members]

    def attach(self, session_id: str) -> int:
        return self._redis.incr(self._key("epoch", session_id))

    def epoch(self, session_id: str) -> int:
        value = cast(bytes | None, self._redis.get(self._key("epoch", session_id)))
        return 0 if value is None else int(value)

    def save_state(self, session_id: str, part: str, data: bytes) -> None:
        keys = [self._key("tok", session_id), self._key("state", session_id)]
        self._save_state(keys=keys, args=[part.encode(), data])

    def state(self, session_id: str, part: str) -> bytes | None:
        return cast(bytes | None, self._redis.hget(self._key("state", session_id), part))


_JOB_FIELDS = [f.name for f in dataclasses.fields(JobRecord)]


class RedisJobStore:
    """`store.JobStore` on Redis: a HASH a job, ZSETs by created time for the listings."""

    def __init__(self, url: str, prefix: str = "vibecast:") -> None:
        self._redis = redis.Redis.from_url(url, decode_responses=False)
        self._prefix = prefix
        self._all = prefix + "jobs"

    def _job(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _owned(self, owner: str) -> str:
        return f"{self._prefix}jobs:owner:{owner}"

    def _owner_of(self, pipe: Pipeline, job_id: str) -> str | None:
        raw = cast(bytes | None, pipe.hget(self._job(job_id), "owner"))
        return None if raw is None else cast(str, json.loads(raw))

    def put(self, job: JobRecord) -> None:
        key = self._job(job.id)
        fields: dict[FieldT, EncodableT] = {
            name: json.dumps(value) for name, value in dataclasses.asdict(job).items()
        }

        # WATCH the job: a put or delete racing this one retries it, so the owner index never
        # keeps an id under an owner the job no longer has.
        def write(pipe: Pipeline) -> None:
            old_owner = self._owner_of(pipe, job.id)
            pipe.multi()
            if old_owner is not None and old_owner != job.owner:
                pipe.zrem(self._owned(old_owner), job.id)
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            pipe.zadd(self._all, {job.id: job.created})
            pipe.zadd(self._owned(job.owner), {job.id: job.created})

        self._redis.transaction(write, key)

    def get(self, job_id: str) -> JobRecord | None:
        raw = cast(dict[bytes, bytes], self._redis.hgetall(self._job(job_id)))
        return self._record(raw) if raw else None

    def _record(self, raw: dict[bytes, bytes]) -> JobRecord:
        # Fields this version does not know are left out; missing ones take their defaults.
        values = {k.decode(): json.loads(v) for k, v in raw.items() if k.decode() in _JOB_FIELDS}
        return JobRecord(**values)

    def _records(self, ids: list[bytes]) -> list[JobRecord]:
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._job(job_id.decode()))
        rows = cast(list[dict[bytes, bytes]], pipe.execute())
        # A job deleted between the listing and the read is skipped.
        return [self._record(raw) for raw in rows if raw]

    def owned_by(self, owner: str) -> list[JobRecord]:
        ids = cast(list[bytes], self._redis.zrange(self._owned(owner), 0, -1, desc=True))
        return self._records(ids)

    def all(self) -> list[JobRecord]:
        return self._records(cast(list[bytes], self._redis.zrange(self._all, 0, -1)))

    def delete(self, job_id: str) -> None:
        key = self._job(job_id)

        def remove(pipe: Pipeline) -> None:
            owner = self._owner_of(pipe, job_id)
            pipe.multi()
            if owner is not None:
                pipe.zrem(self._owned(owner), job_id)
            pipe.zrem(self._all, job_id)
            pipe.delete(key)

        self._redis.transaction(remove, key)

    def close(self) -> None:
        self._redis.close()
