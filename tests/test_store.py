"""The session store's ring of sent frames and admission queue."""

from __future__ import annotations

from vibecast.server.store import MemoryStore, RingFrame


def filled() -> MemoryStore:
    store = MemoryStore()
    store.register("s", "tok")
    index = 0
    for seq in range(10):
        store.ring_append(
            "s",
            RingFrame(index, None, seq * 960, b"turn_start")
            if seq == 5
            else RingFrame(index, seq, (seq + 1) * 960, bytes([seq])),
        )
        index += 1
    return store


def test_tokens_match_only_their_session() -> None:
    store = filled()
    assert store.token_matches("s", "tok")
    assert not store.token_matches("s", "other") and not store.token_matches("x", "tok")
    store.forget("s")
    assert not store.token_matches("s", "tok")


def test_ring_after_returns_what_followed_the_seq() -> None:
    store = filled()
    after = store.ring_after("s", 3)
    assert after is not None
    assert [f.seq for f in after] == [4, None, 6, 7, 8, 9]
    from_start = store.ring_after("s", -1)
    assert from_start is not None
    assert [f.seq for f in from_start][:2] == [0, 1]
    assert store.ring_after("s", 9) == []
    assert store.ring_after("s", 42) is None  # never sent


def test_trimmed_frames_cannot_be_resumed_from() -> None:
    store = filled()
    store.ring_trim("s", keep_from_pts=4 * 960 + 1)  # drops frames ending before that
    assert store.ring_after("s", 1) is None
    assert store.ring_after("s", -1) is None
    kept = store.ring_after("s", 3)
    assert kept is not None
    assert [f.seq for f in kept] == [4, None, 6, 7, 8, 9]


def test_queue_is_first_come_first_served() -> None:
    store = MemoryStore()
    for sid in ("a", "b", "c"):
        store.enqueue(sid)
    store.enqueue("a")  # a second enqueue keeps the first place
    store.dequeue("b")
    assert store.queue() == ["a", "c"]
