"""The session store (tokens, ring of sent frames, admission queue, fencing epoch, engine state)
and the job store: one suite, run against each implementation. The Redis variants use a real
redis-server (tests/redis_server.py), a fresh key prefix per test."""

from __future__ import annotations

import dataclasses
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vibecast.server.job_store import SqliteJobStore
from vibecast.server.redis_store import RedisJobStore, RedisStore
from vibecast.server.store import JobRecord, JobStore, MemoryStore, RingFrame, SessionStore


def fresh_prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[SessionStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    redis_store = RedisStore(request.getfixturevalue("redis_url"), prefix=fresh_prefix())
    try:
        yield redis_store
    finally:
        redis_store.close()


@pytest.fixture
def redis_stores(redis_url: str) -> Iterator[Callable[[str], RedisStore]]:
    """Opens RedisStores on the test's Redis (one prefix: one deployment); closes them after."""
    opened: list[RedisStore] = []

    def open_store(prefix: str) -> RedisStore:
        opened.append(RedisStore(redis_url, prefix=prefix))
        return opened[-1]

    yield open_store
    for s in opened:
        s.close()


def filled(store: SessionStore) -> SessionStore:
    """Session "s": audio seqs 0-9 with a non-audio frame (turn_start) in place of seq 5."""
    store.register("s", "tok")
    for index in range(10):
        store.ring_append(
            "s",
            RingFrame(index, None, index * 960, b"turn_start")
            if index == 5
            else RingFrame(index, index, (index + 1) * 960, bytes([index])),
        )
    return store


def seqs(frames: list[RingFrame] | None) -> list[int | None]:
    assert frames is not None
    return [f.seq for f in frames]


# -- tokens ------------------------------------------------------------------------------------


def test_tokens_match_only_their_session(store: SessionStore) -> None:
    filled(store)
    assert store.token_matches("s", "tok")
    assert not store.token_matches("s", "other") and not store.token_matches("x", "tok")
    store.forget("s")
    assert not store.token_matches("s", "tok")


def test_non_ascii_tokens_compare_without_error(store: SessionStore) -> None:
    store.register("s", "tök")
    assert store.token_matches("s", "tök")
    assert not store.token_matches("s", "tok") and not store.token_matches("s", "tök2")


# -- the ring ----------------------------------------------------------------------------------


def test_ring_after_returns_what_followed_the_seq(store: SessionStore) -> None:
    filled(store)
    assert seqs(store.ring_after("s", 3)) == [4, None, 6, 7, 8, 9]
    assert seqs(store.ring_after("s", -1))[:2] == [0, 1]
    assert store.ring_after("s", 9) == []
    assert store.ring_after("s", 42) is None  # never sent
    last = store.ring_last("s")
    assert last is not None and last.seq == 9
    assert store.ring_last("unknown") is None


def test_ring_frames_round_trip_exactly(store: SessionStore) -> None:
    store.register("s", "tok")
    frames = [
        RingFrame(0, 0, 960, b"\x00\xff" * 700),
        RingFrame(1, None, 960, b""),
        RingFrame(2, 2**40, 2**50, bytes(range(256))),
    ]
    for f in frames:
        store.ring_append("s", f)
    assert store.ring_after("s", -1) == frames


def test_trimmed_frames_cannot_be_resumed_from(store: SessionStore) -> None:
    filled(store)
    store.ring_trim("s", keep_from_pts=4 * 960 + 1)  # drops frames ending before that
    assert store.ring_after("s", 1) is None
    assert store.ring_after("s", -1) is None
    assert seqs(store.ring_after("s", 3)) == [4, None, 6, 7, 8, 9]


def test_resume_from_the_last_trimmed_seq_across_a_trimmed_non_audio_frame(
    store: SessionStore,
) -> None:
    filled(store)
    # Drops seqs 0-4 and the turn_start after seq 4 (it ends at 4800 too).
    store.ring_trim("s", keep_from_pts=5 * 960 + 1)
    assert seqs(store.ring_after("s", 4)) == [6, 7, 8, 9]  # the last trimmed audio seq
    assert store.ring_after("s", 3) is None  # older than what was trimmed
    assert store.ring_after("s", 5) is None  # no audio frame had seq 5
    assert seqs(store.ring_after("s", 7)) == [8, 9]


def test_trim_stops_at_the_first_frame_to_keep(store: SessionStore) -> None:
    store.register("s", "tok")
    for i, end_pts in enumerate([100, 300, 200, 400]):
        store.ring_append("s", RingFrame(i, i, end_pts, b""))
    store.ring_trim("s", keep_from_pts=250)  # 200 sits behind 300: it stays
    assert seqs(store.ring_after("s", 0)) == [1, 2, 3]


def test_trim_never_loses_a_frame_appended_meanwhile(store: SessionStore) -> None:
    store.register("s", "tok")
    appended = 0
    stop = False

    def append() -> None:
        nonlocal appended
        i = 0
        while not stop:
            store.ring_append("s", RingFrame(i, i, (i + 1) * 960, bytes([i % 256])))
            i += 1
            appended = i

    # The writer runs until the trimmer is done, and each trim waits for new appends, so every
    # trim overlaps appends by construction. A short GIL time slice only makes the turns quick.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    writer = threading.Thread(target=append)
    writer.start()
    keep = 0
    try:
        for _ in range(100):
            # Trim to just behind the writer, then check that the ring still runs from the last
            # trimmed seq without a gap (frame i ends at (i + 1) * 960).
            while appended - 5 <= keep and writer.is_alive():
                pass
            assert writer.is_alive(), "the writer failed"
            keep = appended - 5
            store.ring_trim("s", keep_from_pts=keep * 960)
            window = seqs(store.ring_after("s", keep - 2))
            assert window == list(range(keep - 1, keep - 1 + len(window)))
    finally:
        stop = True
        writer.join()
        sys.setswitchinterval(switch)
    assert seqs(store.ring_after("s", keep - 2)) == list(range(keep - 1, appended))


def test_register_starts_the_session_afresh_but_keeps_its_epoch(store: SessionStore) -> None:
    filled(store)
    store.ring_trim("s", keep_from_pts=4 * 960 + 1)
    store.save_state("s", "engine", b"engine")
    epoch = store.attach("s")
    store.register("s", "new")
    assert store.ring_after("s", -1) == []  # no frames, nothing trimmed
    assert store.state("s", "engine") is None
    assert store.token_matches("s", "new") and not store.token_matches("s", "tok")
    assert store.epoch("s") == epoch


def test_unknown_and_forgotten_sessions_keep_nothing(store: SessionStore) -> None:
    store.ring_append("x", RingFrame(0, 0, 960, b"a"))
    store.save_state("x", "engine", b"state")
    assert store.ring_after("x", -1) is None and store.state("x", "engine") is None
    filled(store)
    store.forget("s")
    # A late engine thread writing after the session ended must not bring it back.
    store.ring_append("s", RingFrame(10, 10, 11 * 960, b"late"))
    store.save_state("s", "engine", b"late")
    assert store.ring_after("s", -1) is None and store.state("s", "engine") is None


# -- fencing epoch -----------------------------------------------------------------------------


def test_attach_bumps_a_per_session_epoch_from_zero(store: SessionStore) -> None:
    assert store.epoch("s") == 0
    assert [store.attach("s") for _ in range(3)] == [1, 2, 3]
    assert store.epoch("s") == 3
    assert store.epoch("t") == 0
    assert store.attach("t") == 1
    assert store.epoch("s") == 3


def test_a_writer_learns_it_is_stale(store: SessionStore) -> None:
    store.register("s", "tok")
    old = store.attach("s")
    assert store.epoch("s") == old  # alone: current
    new = store.attach("s")  # a resume elsewhere takes the session over
    assert store.epoch("s") != old
    assert store.epoch("s") == new
    store.forget("s")
    assert store.epoch("s") not in (old, new)  # a finished session has no current writer


def test_concurrent_attaches_get_distinct_epochs(store: SessionStore) -> None:
    got: list[list[int]] = [[] for _ in range(4)]

    def attach(out: list[int]) -> None:
        for _ in range(200):
            out.append(store.attach("s"))

    threads = [threading.Thread(target=attach, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    epochs = [e for out in got for e in out]
    assert sorted(epochs) == list(range(1, 801))
    assert all(out == sorted(out) for out in got)  # each writer sees its epochs rise
    assert store.epoch("s") == 800


# -- engine state ------------------------------------------------------------------------------


def test_state_round_trips_and_is_replaced(store: SessionStore) -> None:
    store.register("s", "tok")
    assert store.state("s", "engine") is None
    blob = bytes(range(256)) * 40
    store.save_state("s", "engine", blob)
    assert store.state("s", "engine") == blob
    store.save_state("s", "engine", b"")
    assert store.state("s", "engine") == b""  # empty, not missing
    assert store.state("t", "engine") is None


def test_state_parts_are_kept_apart(store: SessionStore) -> None:
    store.register("s", "tok")
    store.save_state("s", "spec", b"the start request")
    store.save_state("s", "carry:0", b"turn 0")
    store.save_state("s", "carry:1", b"turn 1")
    assert store.state("s", "spec") == b"the start request"
    assert [store.state("s", f"carry:{k}") for k in range(3)] == [b"turn 0", b"turn 1", None]
    store.forget("s")
    assert store.state("s", "spec") is None and store.state("s", "carry:0") is None


def test_forget_drops_the_state(store: SessionStore) -> None:
    store.register("s", "tok")
    store.register("t", "tok")
    store.save_state("s", "engine", b"one")
    store.save_state("t", "engine", b"two")
    store.forget("s")
    assert store.state("s", "engine") is None
    assert store.state("t", "engine") == b"two"


# -- admission queue ---------------------------------------------------------------------------


def test_queue_is_first_come_first_served(store: SessionStore) -> None:
    for sid in ("a", "b", "c"):
        store.enqueue(sid)
    store.enqueue("a")  # a second enqueue keeps the first place
    store.dequeue("b")
    assert store.queue() == ["a", "c"]


def test_queue_keeps_arrival_order_across_many_sessions(store: SessionStore) -> None:
    sids = [f"s{i:03}" for i in reversed(range(100))]  # arrival order is not name order
    for sid in sids:
        store.enqueue(sid)
    for sid in sids[::2]:
        store.enqueue(sid)  # already waiting: no change
    for sid in sids[::3]:
        store.dequeue(sid)
    store.forget(sids[1])
    store.dequeue("never-queued")
    expected = [sid for i, sid in enumerate(sids) if i % 3 and i != 1]
    assert store.queue() == expected
    store.enqueue(sids[0])  # left and came back: last in line
    assert store.queue() == [*expected, sids[0]]


# -- several gateways on one Redis -------------------------------------------------------------


def test_two_redis_stores_share_one_queue(redis_stores: Callable[[str], RedisStore]) -> None:
    prefix = fresh_prefix()
    a, b = redis_stores(prefix), redis_stores(prefix)
    a.enqueue("x")
    b.enqueue("y")
    a.enqueue("z")
    b.enqueue("x")  # x already waits (enqueued through a): it keeps its place
    assert a.queue() == b.queue() == ["x", "y", "z"]
    a.dequeue("x")
    assert b.queue().index("z") + 1 == 2  # the position a gateway reports is global


def test_two_redis_stores_enqueueing_at_once_lose_nobody(
    redis_stores: Callable[[str], RedisStore],
) -> None:
    prefix = fresh_prefix()
    gateways = {"a": redis_stores(prefix), "b": redis_stores(prefix)}

    def enqueue(name: str) -> None:
        for i in range(300):
            gateways[name].enqueue(f"{name}{i}")
            gateways[name].enqueue(f"{name}{i // 2}")  # a repeat keeps its place

    threads = [threading.Thread(target=enqueue, args=(name,)) for name in gateways]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue = gateways["a"].queue()
    assert queue == gateways["b"].queue()
    for name in gateways:
        assert [sid for sid in queue if sid.startswith(name)] == [f"{name}{i}" for i in range(300)]


def test_two_redis_stores_share_a_session(redis_stores: Callable[[str], RedisStore]) -> None:
    prefix = fresh_prefix()
    a, b = redis_stores(prefix), redis_stores(prefix)
    filled(a)
    a.save_state("s", "engine", b"engine")
    old = a.attach("s")
    assert b.token_matches("s", "tok")
    assert seqs(b.ring_after("s", 8)) == [9]
    assert b.state("s", "engine") == b"engine"
    assert b.attach("s") == old + 1  # the resuming gateway fences the old writer out
    assert a.epoch("s") != old
    other = redis_stores(fresh_prefix())  # another deployment on the same Redis
    assert not other.token_matches("s", "tok") and other.epoch("s") == 0


# -- job store ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def open_jobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], JobStore]]:
    """Opens job stores on one backing (a file, a Redis prefix); closes them after."""
    opened: list[JobStore] = []
    if request.param == "sqlite":
        path = tmp_path / "jobs.sqlite3"

        def open_store() -> JobStore:
            opened.append(SqliteJobStore(path))
            return opened[-1]

    else:
        url, prefix = request.getfixturevalue("redis_url"), fresh_prefix()

        def open_store() -> JobStore:
            opened.append(RedisJobStore(url, prefix))
            return opened[-1]

    yield open_store
    for s in opened:
        s.close()


def job(job_id: str, owner: str = "alice", created: float = 1000.0, **fields: Any) -> JobRecord:
    return dataclasses.replace(JobRecord(job_id, owner, '{"turns": []}', created), **fields)


def test_job_round_trips_every_field(open_jobs: Callable[[], JobStore]) -> None:
    jobs = open_jobs()
    full = JobRecord(
        id="j1",
        owner="key:ops",
        request='{"turns": [{"speaker": 0, "text": "Grüße"}], "voice": "AAEC"}',
        created=1700000000.123456,
        status="failed",
        updated=1700000012.5,
        turns_total=8,
        turns_done=3,
        samples_done=24000 * 61,
        audio_s_estimate=2.0,  # integral, still a float
        error_code="engine_error",
        error_message="out of memory",
    )
    empty = JobRecord(id="j2", owner="127.0.0.1", request="{}", created=1.0)
    jobs.put(full)
    jobs.put(empty)
    for want in (full, empty):
        got = jobs.get(want.id)
        assert got == want
        for name, value in vars(want).items():
            assert type(getattr(got, name)) is type(value), name
    assert empty.error_code is None  # the defaults include None values
    assert jobs.get("missing") is None


def test_owned_by_lists_only_that_owner_newest_first(open_jobs: Callable[[], JobStore]) -> None:
    jobs = open_jobs()
    for job_id, owner, created in [
        ("a1", "alice", 10.0),
        ("b1", "bob", 11.0),
        ("a3", "alice", 30.0),
        ("a2", "alice", 20.5),
        ("b2", "bob", 5.0),
    ]:
        jobs.put(job(job_id, owner, created))
    assert [j.id for j in jobs.owned_by("alice")] == ["a3", "a2", "a1"]
    assert [j.id for j in jobs.owned_by("bob")] == ["b1", "b2"]
    assert jobs.owned_by("carol") == []


def test_all_lists_every_job_oldest_first(open_jobs: Callable[[], JobStore]) -> None:
    jobs = open_jobs()
    for job_id, owner, created in [("x", "alice", 3.0), ("y", "bob", 1.0), ("z", "alice", 2.0)]:
        jobs.put(job(job_id, owner, created))
    assert [j.id for j in jobs.all()] == ["y", "z", "x"]


def test_delete_removes_a_job_from_every_listing(open_jobs: Callable[[], JobStore]) -> None:
    jobs = open_jobs()
    jobs.put(job("x", "alice", 1.0))
    jobs.put(job("y", "alice", 2.0))
    jobs.delete("x")
    jobs.delete("never-there")
    assert jobs.get("x") is None
    assert [j.id for j in jobs.owned_by("alice")] == ["y"]
    assert [j.id for j in jobs.all()] == ["y"]


def test_put_replaces_a_job(open_jobs: Callable[[], JobStore]) -> None:
    jobs = open_jobs()
    jobs.put(job("x", "alice", 1.0, error_code="old", error_message="old"))
    jobs.put(job("x", "alice", 1.0, status="done", turns_done=8, updated=9.5))
    got = jobs.get("x")
    assert got is not None
    assert (got.status, got.turns_done, got.updated) == ("done", 8, 9.5)
    assert got.error_code is None and got.error_message is None  # replaced, not merged
    assert len(jobs.all()) == 1 and len(jobs.owned_by("alice")) == 1
    jobs.put(job("x", "bob", 1.0))  # a new owner: it moves between the owners' listings
    assert jobs.owned_by("alice") == []
    assert [j.id for j in jobs.owned_by("bob")] == ["x"]


def test_jobs_outlive_the_store_object(open_jobs: Callable[[], JobStore]) -> None:
    first = open_jobs()
    first.put(job("x", "alice", 1.0, status="running"))
    first.close()
    again = open_jobs()
    got = again.get("x")
    assert got is not None and got.status == "running"
    assert [j.id for j in again.owned_by("alice")] == ["x"]


def test_a_fenced_writer_cannot_append_after_a_takeover(store: SessionStore) -> None:
    store.register("s", "tok")
    mine = store.attach("s")
    assert store.ring_append("s", RingFrame(0, 0, 960, b"a"), mine)
    newer = store.attach("s")  # another gateway takes the session over
    assert not store.ring_append("s", RingFrame(1, 1, 1920, b"stale"), mine)
    assert store.ring_append("s", RingFrame(1, 1, 1920, b"b"), newer)
    assert [f.data for f in store.ring_after("s", -1) or []] == [b"a", b"b"]
    assert store.ring_append("s", RingFrame(2, 2, 2880, b"c"))  # unfenced: kept


# -- admission: the queue's head runs when there is room --------------------------------------


def test_only_the_first_in_line_is_admitted_and_only_while_there_is_room(
    store: SessionStore,
) -> None:
    for sid in ("a", "b", "c"):
        store.enqueue(sid)
    assert not store.admit("b", 2)  # not first
    assert store.admit("a", 2) and store.admit("b", 2)
    assert store.queue() == ["c"] and store.running() == 2
    assert not store.admit("c", 2)  # first, but no room
    store.release("a")
    assert store.admit("c", 2) and store.running() == 2 and store.queue() == []
    store.register("c", "tok")
    store.forget("c")  # a forgotten session runs no more
    assert store.running() == 1
    store.keep_running(["z"])  # a resumed session comes back, ahead of the queue
    assert store.running() == 2


def test_gateways_admit_against_one_count(redis_stores) -> None:
    prefix = fresh_prefix()
    a, b = redis_stores(prefix), redis_stores(prefix)
    for sid in ("s1", "s2", "s3"):
        a.enqueue(sid)
    assert a.admit("s1", 2) and b.admit("s2", 2)
    assert not b.admit("s3", 2) and b.running() == a.running() == 2


def test_a_running_session_nobody_vouches_for_stops_counting(
    redis_stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vibecast.server import redis_store

    s = redis_stores(fresh_prefix())
    s.enqueue("alive")
    assert s.admit("alive", 2) and s.running() == 1  # within its time to live
    # An entry whose time to live has passed (its gateway stopped renewing it) no longer
    # counts, and its place goes to the next in line: a TTL in the past, so nothing waits.
    monkeypatch.setattr(redis_store, "RUNNING_TTL_S", -1.0)
    s.keep_running(["alive"])
    assert s.running() == 0
    s.enqueue("next")
    assert s.admit("next", 1) and s.running() == 0
