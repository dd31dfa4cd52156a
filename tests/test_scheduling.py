"""The engine loop: deadline first, nothing for held sessions, one unit for a batched group; and
through a real server, listeners that play in real time never run dry while the sessions past
the server's measured capacity wait in line."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from conftest import running_server
from helpers import speakers_of, turns_of
from websockets.exceptions import ConnectionClosed

from vibecast.bench import RealTimeListener
from vibecast.engine.pipeline import PipelineEvent, TurnAudio
from vibecast.engine.scheduler import Scheduler
from vibecast.protocol import Audio, Client, Done

# -- the loop alone, with stand-in runners (no model needed to test the order of work) ---------


@dataclass(eq=False)
class FakeRunner:
    name: str
    units: int
    log: list[str]
    group: Any = None

    def ready(self) -> bool:
        return True

    def run(self) -> list[PipelineEvent] | None:
        if self.units == 0:
            return None
        self.units -= 1
        self.log.append(self.name)
        return [TurnAudio(0, np.zeros(24000, np.float32))]  # one second of audio

    def close(self) -> None:
        pass

    def park(self) -> None:
        pass


@dataclass(eq=False)
class FakeSink:
    lead: float
    wants: bool = True
    ended: threading.Event = field(default_factory=threading.Event)
    put_events: int = 0

    def lead_s(self) -> float:
        return self.lead

    def wants_more(self) -> bool:
        return self.wants

    def put(self, events: list[PipelineEvent], busy_s: float) -> None:
        self.put_events += len(events)
        self.lead += 1.0  # a second of audio more in hand

    def hold(self, held: bool) -> None:
        pass

    def end(self, error: BaseException | None) -> None:
        self.ended.set()


def test_the_least_lead_runs_first() -> None:
    log: list[str] = []
    loop = Scheduler("test")
    gate = threading.Event()
    loop.call(gate.wait)  # hold the loop until every runner is in
    sinks = {"far": FakeSink(2.5), "near": FakeSink(0.0), "mid": FakeSink(1.2)}
    for name, sink in sinks.items():
        loop.add(FakeRunner(name, 3, log), sink)
    gate.set()
    assert all(s.ended.wait(10) for s in sinks.values())
    loop.close()
    # near 0.0 -> 1.0 -> 2.0, mid 1.2 -> 2.2, far 2.5: always the smallest lead next.
    assert log == ["near", "near", "mid", "near", "mid", "far", "mid", "far", "far"]


def test_a_held_session_gets_no_work() -> None:
    log: list[str] = []
    loop = Scheduler("test")
    gate = threading.Event()
    loop.call(gate.wait)
    held, free = FakeSink(-5.0, wants=False), FakeSink(0.0)
    loop.add(FakeRunner("held", 3, log), held)
    loop.add(FakeRunner("free", 3, log), free)
    gate.set()
    assert free.ended.wait(10)
    assert log == ["free"] * 3 and held.put_events == 0
    held.wants = True
    loop.wake()
    assert held.ended.wait(10)
    loop.close()
    assert log == ["free"] * 3 + ["held"] * 3


class FakeGroup:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def run(self, runners: list[Any]) -> dict[Any, list[PipelineEvent] | None]:
        self.calls.append(len(runners))
        return {r: r.run() for r in runners}


def test_a_batched_group_runs_in_one_unit() -> None:
    log: list[str] = []
    group = FakeGroup()
    loop = Scheduler("test")
    gate = threading.Event()
    loop.call(gate.wait)
    sinks = [FakeSink(float(i)) for i in range(5)]
    for i, sink in enumerate(sinks):
        loop.add(FakeRunner(f"s{i}", 2, log, group=group), sink)
    gate.set()
    assert all(s.ended.wait(10) for s in sinks)
    loop.close()
    # Two steps of all five, then one call in which each finds it has no more work.
    assert group.calls == [5, 5, 5] and loop.units == 3


# -- through a real server: real-time listeners ------------------------------------------------


@dataclass
class Listener:
    """A client that plays in real time (the bench's `RealTimeListener`: a cushion before it
    plays, a stall whenever it runs dry) and reports `playback` as it goes."""

    queued: list[int] = field(default_factory=list)
    player: RealTimeListener = field(default_factory=RealTimeListener)
    done: bool = False

    @property
    def stalls(self) -> int:
        return self.player.stalls

    async def run(self, url: str, turns: list[dict[str, Any]]) -> None:
        async with await Client.connect(url) as client:
            ready = await client.start(
                speakers_of(2), turns, on_queued=lambda q: self.queued.append(q.position)
            )
            rate = ready.format["sample_rate"]
            async for msg in client:
                if isinstance(msg, Audio):
                    self.player.receive(time.perf_counter(), msg.samples * 1000 / rate)
                    with contextlib.suppress(ConnectionClosed):  # it may have just ended
                        await client.playback(int(self.player.played_ms))
                elif isinstance(msg, Done):
                    self.player.finish(time.perf_counter())
                    self.done = True


def test_listeners_started_at_once_never_run_dry_and_the_rest_wait(piper) -> None:
    with running_server(piper) as server:
        capacity = server.state.sessions.capacity
        listeners = [Listener() for _ in range(max(8, capacity + 2))]

        async def main() -> None:
            await asyncio.gather(*(lis.run(server.ws_url, turns_of()[:2]) for lis in listeners))

        asyncio.run(main())
    admitted = [lis for lis in listeners if not lis.queued]
    waited = [lis for lis in listeners if lis.queued]
    assert all(lis.done for lis in listeners)
    assert len(admitted) == capacity and len(waited) == len(listeners) - capacity
    assert [lis.stalls for lis in admitted] == [0] * capacity, [
        (lis.stalls, lis.queued) for lis in listeners
    ]
    for lis in waited:  # positions only go down, and each was told where it stood
        assert lis.queued == sorted(lis.queued, reverse=True) and lis.queued[-1] >= 1
