"""vibecast on a real local Ray cluster (server/cluster.py) with a real redis-server: sessions
spread over two engine replicas; an engine SIGKILLed mid-session loses no audio (its sessions
go on on the other engine, on the same socket, and their audio equals an uninterrupted run);
no engine stream outlives its session, even when its gateway is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest
import redis
from helpers import DIALOGUE, turns_of
from websockets.exceptions import ConnectionClosed

from vibecast.protocol import Audio, Client, Done, ServerError, TurnEnd

ray = pytest.importorskip("ray", reason="the cluster extra: pip install 'vibecast[cluster]'")
serve = pytest.importorskip("ray.serve")

from vibecast.server.cluster import APP, PREFIX, application  # noqa: E402
from vibecast.server.config import ServerConfig  # noqa: E402
from vibecast.server.redis_store import RedisStore  # noqa: E402

pytestmark = pytest.mark.slow

SESSIONS = 4
CAPACITY = 4  # sessions generating at once, every gateway's together
QUEUE = 3
# What a failover may add to the largest gap of the same sessions without one. The loss is
# seen in ~20 ms, another engine streams ~80 ms later from the last mark of the turn in
# progress (its text stage again, then the next vocoder window), while the replacement
# replica warms up on the same 2 cores: 150-280 ms measured; the bound leaves room for a
# busier machine.
STALL_S = 0.5
SCRIPT = [(s, t) for s, t in DIALOGUE[:6]]
SPEAKERS = [{"voice": v} for v in ("joe", "joe-high", "joe-deep", "joe-bright")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, url: str, port: int, metrics_port: int) -> None:
        self.redis = redis.Redis.from_url(url)
        self.store = RedisStore(url)
        # Every change to the cluster's keys, to wait on instead of polling.
        self.redis.config_set("notify-keyspace-events", "KA")
        self._changes = self.redis.pubsub(ignore_subscribe_messages=True)
        self._changes.psubscribe(f"__keyspace@*__:{PREFIX}*")
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.ws_url = f"ws://127.0.0.1:{port}/v1/stream"

    def engines(self) -> list[int]:
        return sorted(int(p) for p in self.redis.smembers(f"{PREFIX}engines") if alive(int(p)))

    def streams(self, pid: int) -> int:
        return int(self.redis.scard(f"{PREFIX}engine:{pid}"))

    def changed(self, timeout: float) -> None:
        """Until the next change to the cluster's keys in Redis, or `timeout` seconds."""
        self._changes.get_message(timeout=timeout)

    def abandoned(self) -> list[float]:
        """When engines stopped streams whose gateway was gone (epoch seconds)."""
        return [float(self.redis.get(k) or 0) for k in self.redis.keys(f"{PREFIX}abandoned:*")]

    def gateway_of(self, session_id: str) -> int:
        return int(self.redis.hget(f"{PREFIX}state:{{{session_id}}}", "gateway") or 0)

    def gateways(self) -> list[int]:
        return sorted(int(p) for p in self.redis.smembers(f"{PREFIX}gateways") if alive(int(p)))

    def served(self, pid: int) -> int:
        return int(self.redis.get(f"{PREFIX}served:{pid}") or 0)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[Cluster]:
    folder = tempfile.mkdtemp(prefix="vc-ray-", dir="/tmp")  # Ray's socket paths stay short
    metrics_port = free_port()
    os.environ["RAY_metrics_report_interval_ms"] = "500"  # the replicas' gauges, soon
    ray.init(
        num_cpus=8,  # logical: the replicas mostly wait; the machine has 2 cores
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=folder,
        _metrics_export_port=metrics_port,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(store_url=redis_url, turn_cache=False, resume_grace_s=30).replace(
            max_sessions=CAPACITY, max_queue=QUEUE
        )
        serve.run(application(config, engines=2, gateways=2), name=APP, route_prefix="/")
        yield Cluster(redis_url, port, metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


async def take(url: str, seed: int, started: asyncio.Event | None = None) -> dict[str, Any]:
    """A whole session read as fast as it comes: its packets and the gaps between them."""
    async with await Client.connect(url) as client:
        await client.start(SPEAKERS, turns_of(SCRIPT), options={"seed": seed})
        packets: list[bytes] = []
        arrivals: list[float] = []
        done = None
        async for msg in client:
            if isinstance(msg, Audio):
                packets += msg.packets or []
                arrivals.append(time.monotonic())
                if started is not None and len(arrivals) == 5:
                    started.set()
            elif isinstance(msg, Done):
                done = msg
    assert done is not None
    gaps = np.diff(arrivals) if len(arrivals) > 1 else np.zeros(1)
    return {"packets": packets, "max_gap_s": float(gaps.max()), "done": done}


async def together(url: str, seeds: list[int]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(take(url, s) for s in seeds)))


def test_sessions_spread_over_the_engines(cluster: Cluster) -> None:
    engines = cluster.engines()
    assert len(engines) == 2
    before = {pid: cluster.served(pid) for pid in engines}
    results = asyncio.run(together(cluster.ws_url, list(range(SESSIONS))))
    assert all(r["done"].turns == len(SCRIPT) for r in results)
    served = {pid: cluster.served(pid) - before[pid] for pid in engines}
    assert sum(served.values()) == SESSIONS and min(served.values()) >= 1, served


def samples(text: str, name: str) -> dict[str, float]:
    """A Prometheus text's samples of `name`, by their replica label."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            replica = re.search(r'replica="([^"]+)"', line)
            assert replica, line
            out[replica.group(1)] = float(line.rsplit(" ", 1)[1])
    return out


def test_one_metrics_view_across_replicas(cluster: Cluster) -> None:
    """Ray exports every replica's gauges on the node's metrics port: both engines and both
    gateways, each under its own replica label, in one scrape."""
    asyncio.run(take(cluster.ws_url, 500))

    def scrape() -> str:
        with urllib.request.urlopen(cluster.metrics_url, timeout=5) as r:
            return r.read().decode()

    def complete() -> bool:
        text = scrape()
        made = samples(text, "ray_vibecast_engine_audio_seconds")
        return (
            len(made) == 2
            and sum(made.values()) > 0
            and len(samples(text, "ray_vibecast_gateway_sessions_active")) == 2
        )

    wait_until(cluster, complete, 30.0)
    text = scrape()
    assert len(samples(text, "ray_vibecast_engine_streams")) == 2


def test_an_engine_killed_mid_session_loses_no_audio(cluster: Cluster) -> None:
    seeds = [100, 101]  # one session on each engine, read as fast as they come
    reference = asyncio.run(together(cluster.ws_url, seeds))

    async def with_a_kill() -> tuple[list[dict[str, Any]], int]:
        flags = [asyncio.Event() for _ in seeds]
        runs = [
            asyncio.create_task(take(cluster.ws_url, s, f))
            for s, f in zip(seeds, flags, strict=True)
        ]
        await asyncio.gather(*(f.wait() for f in flags))
        busiest = max(cluster.engines(), key=cluster.streams)
        assert cluster.streams(busiest) > 0
        os.kill(busiest, signal.SIGKILL)
        return list(await asyncio.gather(*runs)), busiest

    results, killed = asyncio.run(with_a_kill())
    for got, want in zip(results, reference, strict=True):
        assert got["done"].turns == len(SCRIPT)
        assert got["packets"] == want["packets"]  # the same audio, packet for packet
    # The largest gap between audio messages, with and without the kill: on 2 cores the gaps of
    # two sessions read as fast as they come are already a few hundred ms (Piper's chunks).
    gaps = max(r["max_gap_s"] for r in results)
    calm = max(r["max_gap_s"] for r in reference)
    print(f"\nengine killed: largest gap {gaps * 1000:.0f} ms, without a kill {calm * 1000:.0f} ms")
    assert gaps <= calm + STALL_S

    # No stream outlives its session, and Serve puts a new engine in the dead one's place.
    took = wait_until(
        cluster,
        lambda: (
            len(cluster.engines()) == 2 and not any(cluster.streams(p) for p in cluster.engines())
        ),
        10.0,
    )
    print(f"a replacement engine was up {took:.1f} s after the sessions ended")
    assert killed not in cluster.engines()


def wait_until(cluster: Cluster, check: Any, seconds: float) -> float:
    """Seconds until `check()` held, looking again at each change of the cluster's state in
    Redis (every replica stamps it at least once a second), or raise after `seconds`."""
    start = time.monotonic()
    while not check():
        left = seconds - (time.monotonic() - start)
        if left <= 0:
            raise AssertionError(f"not within {seconds} s")
        cluster.changed(left)
    return time.monotonic() - start


async def resumed(
    cluster: Cluster, url: str, session_id: str, token: str, last_seq: int
) -> list[Any]:
    """The rest of a session after its gateway died: reconnect (the proxy may still send the
    first tries to the dead replica) and resume with the token and the last seq."""
    for _ in range(100):
        try:
            client = await Client.connect(url)
            await client.resume(session_id, token, last_seq)
            break
        except (OSError, ConnectionClosed, ServerError) as e:
            if isinstance(e, ServerError) and e.code != "internal":
                raise
            # The proxy still had the dead replica: try again once the cluster has moved.
            await asyncio.to_thread(cluster.changed, 5.0)
    else:
        raise AssertionError("no gateway took the resume")
    async with client:
        return [m async for m in client]


def test_a_killed_gateways_sessions_resume_on_another(cluster: Cluster) -> None:
    orphans: list[float] = []  # how many sessions the killed gateway had; when it was killed
    for key in cluster.redis.keys(f"{PREFIX}abandoned:*"):  # only this test's count
        cluster.redis.delete(key)

    async def kill_mid_session() -> tuple[list[list[Any]], int]:
        clients: list[Client] = []
        readies: list[Any] = []
        msgs: list[list[Any]] = []
        for i in range(2):
            c = await Client.connect(cluster.ws_url)
            readies.append(await c.start(SPEAKERS, turns_of(SCRIPT), options={"seed": 400 + i}))
            clients.append(c)
            msgs.append([])
        for c, m in zip(clients, msgs, strict=True):
            while sum(isinstance(x, Audio) for x in m) < 20:
                m.append(await c.recv())
        owners = [cluster.gateway_of(r.session_id) for r in readies]
        busiest = max(set(owners), key=owners.count)
        orphans.append(owners.count(busiest))
        os.kill(busiest, signal.SIGKILL)
        orphans.append(time.time())
        for c, r, m in zip(clients, readies, msgs, strict=True):
            if cluster.gateway_of(r.session_id) != busiest:
                m += [x async for x in c]  # the other gateway's session just goes on
                continue
            async for x in c:  # what was on its way before the socket closed
                m.append(x)
            # A resume sends every message after the last audio received (docs/protocol.md).
            end = max(i for i, x in enumerate(m) if isinstance(x, Audio))
            last = m[end].seq
            del m[end + 1 :]
            m += await resumed(cluster, cluster.ws_url, r.session_id, r.resume_token, last)
        return msgs, busiest

    results, killed = asyncio.run(kill_mid_session())
    for m in results:
        seqs = [x.seq for x in m if isinstance(x, Audio)]
        assert seqs == list(range(len(seqs)))  # 0 missing, 0 duplicated
        assert [x.turn for x in m if isinstance(x, TurnEnd)] == list(range(len(SCRIPT)))
        assert sum(isinstance(x, Done) for x in m) == 1
    # The streams the dead gateway had opened were stopped by their engines (their liveness
    # ran out) within 3 s of the kill; nothing is left running.
    count, killed_at = int(orphans[0]), orphans[1]
    stopped = cluster.abandoned()
    assert len(stopped) == count, stopped
    late = max(stopped) - killed_at
    print(f"\ngateway {killed} killed: its {count} orphaned stream(s) stopped {late:.2f} s later")
    assert late <= 3.0
    assert not any(cluster.streams(p) for p in cluster.engines())


def test_over_capacity_sessions_wait_in_one_line_across_gateways(cluster: Cluster) -> None:
    """1.5x capacity through two gateways: the first CAPACITY start, the rest wait in one queue
    whose positions only go down and which admits in arrival order; past the queue, a clear
    refusal at once."""

    # Sessions of a gateway killed by an earlier test count until their entries expire.
    wait_until(cluster, lambda: cluster.store.running() == 0, 10.0)

    async def scenario() -> tuple[list[list[int]], list[int], str]:
        positions: list[list[int]] = []
        admitted: list[int] = []
        clients: list[Client] = []
        starts: list[asyncio.Task[Any]] = []
        for i in range(CAPACITY + QUEUE):  # one after another: arrival order is i
            client = await Client.connect(cluster.ws_url)
            seen: list[int] = []
            positions.append(seen)
            arrived = asyncio.Event()

            def queued(msg: Any, seen: list[int] = seen, arrived: asyncio.Event = arrived) -> None:
                seen.append(msg.position)
                arrived.set()

            async def start(
                c: Client = client, i: int = i, arrived: asyncio.Event = arrived
            ) -> None:
                await c.start(
                    SPEAKERS, turns_of(SCRIPT), options={"seed": 600 + i}, on_queued=queued
                )
                admitted.append(i)
                arrived.set()

            starts.append(asyncio.create_task(start()))
            clients.append(client)
            await arrived.wait()  # ready or queued: it has its place before the next one comes
        refused = ""
        extra = await Client.connect(cluster.ws_url)
        try:
            # Bounded: a start that queued or hung instead of being refused fails the test.
            await asyncio.wait_for(
                extra.start(SPEAKERS, turns_of(SCRIPT), options={"seed": 700}), 30
            )
        except ServerError as e:
            refused = e.code
        finally:
            await extra.close()
        assert sorted(admitted) == list(range(CAPACITY))  # the rest wait, holding no slot
        for i, client in enumerate(clients):  # each session ends in turn: the next one starts
            if i >= CAPACITY:
                await starts[i]
            async with client:
                assert [m async for m in client if isinstance(m, Done)]
        return positions, admitted, refused

    positions, admitted, refused = asyncio.run(scenario())
    assert refused == "busy"
    assert admitted == list(range(CAPACITY + QUEUE))  # admission in arrival order
    for i, seen in enumerate(positions[CAPACITY:]):
        assert seen[0] == i + 1 and seen == sorted(seen, reverse=True), positions


def test_turns_appended_to_an_open_script_are_spoken(cluster: Cluster) -> None:
    async def scenario() -> list[Any]:
        async with await Client.connect(cluster.ws_url) as client:
            await client.start(SPEAKERS, turns_of(SCRIPT[:2]), more=True, options={"seed": 800})
            msgs: list[Any] = []
            while not any(isinstance(m, TurnEnd) for m in msgs):
                msgs.append(await client.recv())
            await client.append(turns_of(SCRIPT[2:4]), more=False)
            msgs += [m async for m in client]
        return msgs

    msgs = asyncio.run(scenario())
    assert [m.turn for m in msgs if isinstance(m, TurnEnd)] == [0, 1, 2, 3]
    assert sum(isinstance(m, Done) for m in msgs) == 1


def test_a_gateway_scaled_down_finishes_its_sessions(cluster: Cluster, redis_url: str) -> None:
    """Scaling the gateways from 2 to 1: the one Serve stops takes no new session and drains,
    keeping its clients' sockets until their sessions end (graceful_shutdown_timeout_s is the
    session cap); every session finishes whole. Last in this file: it leaves one gateway."""

    async def scenario() -> list[list[Any]]:
        clients: list[Client] = []
        owners = set()
        for i in range(4):  # on both gateways; they wait, unread, while the change happens
            c = await Client.connect(cluster.ws_url)
            ready = await c.start(SPEAKERS, turns_of(SCRIPT), options={"seed": 900 + i})
            # The gateway stamps its sessions as their engine work starts, maybe after `ready`.
            sid = ready.session_id
            stamped = partial(cluster.gateway_of, sid)
            await asyncio.to_thread(wait_until, cluster, stamped, 30)
            owners.add(cluster.gateway_of(sid))
            clients.append(c)
        assert len(owners) == 2, owners  # one of them is going to stop
        config = ServerConfig(store_url=redis_url, turn_cache=False, resume_grace_s=30).replace(
            max_sessions=CAPACITY, max_queue=QUEUE
        )
        app = application(config, engines=2, gateways=1)
        await asyncio.to_thread(serve.run, app, name=APP, route_prefix="/")
        results = []
        for c in clients:
            async with c:
                results.append([m async for m in c])
        return results

    for msgs in asyncio.run(scenario()):
        seqs = [m.seq for m in msgs if isinstance(m, Audio)]
        assert seqs == list(range(len(seqs)))
        assert [m.turn for m in msgs if isinstance(m, TurnEnd)] == list(range(len(SCRIPT)))
        assert sum(isinstance(m, Done) for m in msgs) == 1
    wait_until(cluster, lambda: len(cluster.gateways()) == 1, 30.0)  # the drained one is gone
