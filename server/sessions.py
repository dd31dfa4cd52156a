"""All sessions of this server: policy checks on `start`, admission (capacity and a FIFO queue
with positions), rate limits, and lookup for resume and downloads.

Capacity counts the sessions that are generating for a connected client (`running`). A session
whose socket dropped keeps its place for `resume_grace_s` but not its slot: its generation
pauses and the slot goes to the next in line; a `resume` takes a slot back at once, ahead of the
queue, since its listener is mid-playback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from ..engine.backend import Backend, SpeakerVoice, SynthesisParams, Turn
from ..engine.scheduler import Scheduler
from ..engine.voice_audio import decode_voice_audio
from ..protocol.messages import Code, ProtocolError, Start, TurnSpec
from .archive import Archive
from .config import ServerConfig
from .content_filter import ContentFilter
from .metrics import Metrics
from .output import OutputFormat
from .revive import Continuation, continuation, load_spec
from .session import Outcome, Session, SessionSpec, State
from .store import SessionStore
from .turn_cache import TurnCache

log = logging.getLogger("vibecast.sessions")

QUEUE_POLL_S = 0.25
KEEP_RUNNING_S = 1.0  # well inside store.RUNNING_TTL_S


class Sessions:
    def __init__(
        self,
        backend: Backend,
        config: ServerConfig,
        store: SessionStore,
        archive: Archive,
        metrics: Metrics,
        catalogue: dict[str, str],
    ) -> None:
        # First, so that bad filter settings stop the start-up before any thread is made; an
        # attribute, so that every way in (WebSocket, HTTP) checks text with the same filter.
        self.content_filter = ContentFilter.from_config(config)
        self.cache = (
            TurnCache(config.turn_cache_dir, config.turn_cache_max_bytes)
            if config.turn_cache
            else None
        )
        self.backend = backend
        self.config = config
        self.limits = config.limits
        self.store = store
        self.archive = archive
        self.metrics = metrics
        self.catalogue = catalogue  # voice id -> description
        self.sessions: dict[str, Session] = {}
        self.running: set[str] = set()  # this server's sessions holding an engine slot
        # A shared store counts every gateway's running sessions; this one vouches for its own.
        self._keeper = (
            asyncio.get_running_loop().create_task(self._keep_running()) if store.shared else None
        )
        # How many sessions generate at once: set, or what the backend measured at warm-up it
        # keeps in real time on this machine.
        self.capacity = config.max_sessions or backend.realtime_capacity()
        self.scheduler = Scheduler(backend.name)
        # Resampling and Opus for every session: a couple of threads, not one per session.
        self._output = ThreadPoolExecutor(max_workers=2, thread_name_prefix="output")
        self._queue_changed = asyncio.Condition()
        self._starts: dict[str, deque[float]] = {}
        self._recent_walls: deque[float] = deque(maxlen=20)
        self.changed = threading.Condition()  # notified whenever a session comes or goes
        # Decoding uploads is CPU work that must not run on the event loop; two workers bound
        # how much of the machine a burst of uploads can take from the sessions that play.
        self._prepare = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block (off the event loop) until `predicate()` holds; False on timeout."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def _changed(self) -> None:
        with self.changed:
            self.changed.notify_all()

    # -- policy --------------------------------------------------------------------------------

    def check_turns(self, turns: list[TurnSpec], before: int, chars_before: int) -> list[Turn]:
        """Turns numbered after `before`, or too_long naming the turn that crosses a limit, or
        content_rejected naming the first turn the content filter refuses. The text of an open
        turn (`stream`, always the last) is kept as sent: more of it follows."""
        lim = self.limits
        if before + len(turns) > lim.max_turns:
            raise ProtocolError(
                Code.TOO_LONG,
                f"turns: the script would have {before + len(turns)}; this server allows "
                f"{lim.max_turns} (limits.max_turns). Split it into several sessions.",
                field="turns",
                turn=lim.max_turns,
            )
        chars = chars_before
        for i, t in enumerate(turns):
            chars += len(t.text)
            self._check_size(chars, f"turns[{i}]", f"turns[{i}].text", before + i)
        # After the limits, which bound the filter's work; before any voice decoding, engine work
        # or admission (start and append both come through here), so a refused turn never
        # produces audio.
        self.content_filter.check(turns, before)
        return [
            Turn(before + i, t.speaker, t.text if t.stream else t.text.strip())
            for i, t in enumerate(turns)
        ]

    def check_piece(self, before: str, piece: str, chars_before: int, turn: int) -> None:
        """A `text` piece of open turn `turn`, whose text so far is `before`: too_long when it
        takes the script past a limit, content_rejected when the content filter refuses it in
        the context of the text before it. Either way the piece is not added (as an over-long
        or refused append adds no turn) and the turn stays open."""
        label = f"text.text (turn {turn})"
        self._check_size(
            chars_before + len(piece),
            label,
            "text.text",
            turn,
            "This piece was not added; end the turn with final: true, and go on in a new session.",
        )
        self.content_filter.check_piece(before, piece, turn)

    def _check_size(
        self,
        chars: int,
        label: str,
        field: str,
        turn: int,
        fix: str = "Split it into several sessions.",
    ) -> None:
        """too_long naming `label` when `chars` characters of script pass max_chars or (by the
        backend's estimate) max_audio_s."""
        lim = self.limits
        if chars > lim.max_chars:
            raise ProtocolError(
                Code.TOO_LONG,
                f"{label} takes the script to {chars} characters; this server allows "
                f"{lim.max_chars} (limits.max_chars). {fix}",
                field=field,
                turn=turn,
            )
        rate = self.backend.seconds_per_char()
        if chars * rate > lim.max_audio_s:
            raise ProtocolError(
                Code.TOO_LONG,
                f"{label} takes the script to about {chars * rate / 60:.0f} minutes of audio; "
                f"this server allows {lim.max_audio_s / 60:.0f} (limits.max_audio_s). {fix}",
                field=field,
                turn=turn,
            )

    async def validate(self, start: Start, client: str) -> SessionSpec:
        """Check a `start` against this server's limits and voices; decode uploaded voices."""
        lim = self.limits
        if len(start.speakers) > lim.max_speakers:
            raise ProtocolError(
                Code.TOO_MANY_SPEAKERS,
                f"speakers has {len(start.speakers)} entries; this server allows at most "
                f"{lim.max_speakers} (limits.max_speakers). Give some lines to the same speaker.",
                field="speakers",
            )
        turns = self.check_turns(start.turns, 0, 0)
        # An open turn is the last; the engine sees it once its text is final (engine/pipeline.py).
        opened = turns.pop() if start.turns and start.turns[-1].stream else None
        speakers = []
        loop = asyncio.get_running_loop()
        for i, s in enumerate(start.speakers):
            name = s.name or f"Speaker {i + 1}"
            if s.voice is not None:
                if s.voice not in self.catalogue:
                    known = ", ".join(self.catalogue) or "(none: upload voice_audio)"
                    raise ProtocolError(
                        Code.UNKNOWN_VOICE,
                        f"speakers[{i}].voice is {s.voice!r}, which this server does not have; "
                        f"choose one of: {known}"
                        " (GET /v1/voices).",
                        field=f"speakers[{i}].voice",
                    )
                speakers.append(SpeakerVoice(name, voice_id=s.voice))
                continue
            assert s.voice_audio is not None
            audio, rate = await loop.run_in_executor(
                self._prepare,
                decode_voice_audio,
                s.voice_audio,
                s.voice_format,
                f"speakers[{i}].voice_audio",
            )
            speakers.append(SpeakerVoice(name, audio=audio, audio_rate=rate))

        f = start.format
        codec = f.codec if f else "opus"
        default_rate = 48000 if codec == "opus" else self.backend.sample_rate
        fmt = OutputFormat(
            codec=codec,
            sample_rate=(f.sample_rate if f and f.sample_rate else default_rate),
            bitrate=(f.bitrate if f and f.bitrate else 32000),
            frame_ms=(f.frame_ms if f and f.frame_ms else 20),
        )
        o = start.options
        from_turn = o.from_turn if o and o.from_turn is not None else 0
        n = len(start.turns)
        if from_turn and from_turn >= n:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"options.from_turn is {from_turn}, but the script has {n} turns "
                f"(0 .. {n - 1}); send a turn index of this start's turns.",
                field="options.from_turn",
            )
        params = SynthesisParams(
            # A fixed default: the same request makes the same audio, and repeats come from the
            # turn cache; another seed is another take.
            seed=o.seed if o and o.seed is not None else 0,
            mode=o.mode if o and o.mode else self.backend.modes[0],
            cfg_scale=o.cfg_scale if o else None,
            steps=o.steps if o else None,
            frames_per_turn=o.frames_per_turn if o else None,
        )
        self.backend.check_params(params)
        return SessionSpec(
            speakers, turns, start.more, fmt, params, start.request_id, client, from_turn, opened
        )

    def check_rate(self, client: str) -> None:
        now = time.monotonic()
        if len(self._starts) > 4096:  # forget clients that have been quiet for a minute
            self._starts = {k: w for k, w in self._starts.items() if w and now - w[-1] <= 60.0}
        window = self._starts.setdefault(client, deque())
        while window and now - window[0] > 60.0:
            window.popleft()
        if len(window) >= self.config.starts_per_minute:
            wait = 60.0 - (now - window[0])
            raise ProtocolError(
                Code.RATE_LIMITED,
                f"this client started {len(window)} sessions in the last minute; the limit is "
                f"{self.config.starts_per_minute}. Try again in {wait:.0f} s.",
                fatal=True,
            )
        window.append(now)

    # -- admission -------------------------------------------------------------------------------

    def create(
        self, spec: SessionSpec, taken_over: tuple[str, str, Continuation] | None = None
    ) -> Session:
        """A session of this server; `taken_over`: one another gateway ran (server/revive.py)."""
        session = Session(
            spec,
            self.backend,
            self.scheduler,
            self._output,
            self.store,
            self.archive,
            self.limits,
            self.config.send_buffer_ms,
            on_concluded=self._concluded,
            on_change=self._changed,
            cache=self.cache,
            taken_over=taken_over,
        )
        self.sessions[session.id] = session
        self._changed()
        return session

    def _has_slot(self, session_id: str) -> bool:
        """First in the queue and room: admitted (in the store, across gateways when shared)."""
        return self.store.admit(session_id, self.capacity)

    async def admit(
        self, session: Session, on_position: Callable[[int, float | None], Awaitable[None]]
    ) -> None:
        """Wait for an engine slot, first come first served, reporting the queue position."""
        if (
            len(self.store.queue()) >= self.config.max_queue
            and self.store.running() >= self.capacity
        ):
            error = ProtocolError(
                Code.BUSY,
                f"the server is at capacity ({self.capacity} sessions generating) and "
                f"{self.config.max_queue} sessions are already waiting; try again in a minute.",
                fatal=True,
            )
            self.end(session, error)
            raise error
        self.store.enqueue(session.id)
        self.metrics.queued.inc()
        try:
            reported = None
            async with self._queue_changed:
                while session.state is State.QUEUED and not self._has_slot(session.id):
                    position = self.store.queue().index(session.id) + 1
                    if position != reported:
                        reported = position
                        await on_position(position, self._eta(position))
                    await self._queue_wait()
                if session.state is State.QUEUED:
                    self.running.add(session.id)
        finally:
            self.store.dequeue(session.id)
            self.metrics.queued.dec()
            await self._notify()

    def _eta(self, position: int) -> float | None:
        if not self._recent_walls:
            return None
        mean = sum(self._recent_walls) / len(self._recent_walls)
        return round(mean * position / self.capacity, 1)

    async def _keep_running(self) -> None:
        while True:
            await asyncio.sleep(KEEP_RUNNING_S)
            try:
                self.store.keep_running(list(self.running))
            except Exception:  # noqa: BLE001 - the store is back at the next round
                log.exception("could not tell the store which sessions run here")

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()

    async def room(self) -> None:
        """Wait until the queue has room for one more (a job waits here instead of being
        refused `busy`: it is kept, and nobody holds a socket open for it)."""
        async with self._queue_changed:
            while (
                len(self.store.queue()) >= self.config.max_queue
                and self.store.running() >= self.capacity
            ):
                await self._queue_wait()

    async def _queue_wait(self) -> None:
        """Until the queue may have moved. A shared queue (a cluster's gateways) also moves
        when another gateway admits or ends a session, which no event here tells: look again
        every QUEUE_POLL_S."""
        if not self.store.shared:
            await self._queue_changed.wait()
            return
        try:
            await asyncio.wait_for(self._queue_changed.wait(), QUEUE_POLL_S)
        except TimeoutError:
            pass

    async def _notify(self) -> None:
        async with self._queue_changed:
            self._queue_changed.notify_all()

    def _release(self, session: Session) -> None:
        """The session stops holding an engine slot: the next in line may start."""
        if session.id in self.running:
            self.running.discard(session.id)
            self.store.release(session.id)
            asyncio.get_running_loop().create_task(self._notify())

    def _concluded(self, session: Session) -> None:
        """On the event loop: the session's outcome is known; its generation has stopped."""
        if session.id in self.running:
            self._recent_walls.append(time.monotonic() - session.counters.ready_at)
        self._release(session)
        self._changed()

    def detached(self, session: Session) -> None:
        """The connection that had the session let go of it (closed or dropped)."""
        self._changed()
        if session.delivered or session.id not in self.sessions:
            return
        if not session.announced or self.config.resume_grace_s <= 0:
            # Its resume token never reached a client (queued, opening, or open failed), so
            # nobody can come back for it: free it now rather than after the grace period.
            self.end(session)
            return
        # Paused (Session.attached is False) and out of the count that admits new sessions.
        self._release(session)
        self.metrics.detached.set(self.detached_count())
        epoch = session.epoch
        asyncio.get_running_loop().call_later(
            self.config.resume_grace_s, self._expire, session, epoch
        )

    def reattached(self, session: Session) -> None:
        """A `resume` took the session: it generates again at once, ahead of the queue."""
        if session.state is not State.CONCLUDED:
            self.running.add(session.id)
            self.store.keep_running([session.id])
        self.metrics.detached.set(self.detached_count())

    def _expire(self, session: Session, epoch: int) -> None:
        if session.id in self.sessions and session.epoch == epoch and not session.attached:
            self.end(session)

    def crashed(self, session: Session) -> None:
        """The connection's boundary caught a bug; it sends the error itself."""
        if session.id in self.sessions:
            session.fail(Code.INTERNAL, "the connection failed")
            session.delivered = True
            self.end(session)

    def let_go(self, session: Session) -> None:
        """Another gateway took the session over (its fencing epoch moved on): stop it here and
        free what it holds here, but leave its state in the store to the new owner."""
        if session.id not in self.sessions:
            return
        log.info("session %s was taken over by another gateway; letting it go", session.id)
        session.stop()
        self._release(session)
        del self.sessions[session.id]
        self.metrics.detached.set(self.detached_count())
        self._changed()

    def end(self, session: Session, refused: ProtocolError | None = None) -> None:
        """The one end of every session: its terminal message was delivered (`delivered`), it
        was refused before it started (`refused`), or nobody came back for it. Records the
        outcome, stops the engine, frees its slot, queue place, resume state and archive entry,
        and writes the session_end line."""
        if session.id not in self.sessions:
            return
        if session.outcome is None:
            if refused is not None:
                session.conclude(Outcome.FAILED, refused.to_message())
            else:
                session.conclude(Outcome.ABANDONED)
        session.stop()
        self._release(session)
        del self.sessions[session.id]
        # With a shared store, only the gateway holding the session's epoch clears its state
        # (another may have taken it over meanwhile).
        if not self.store.shared or self.store.epoch(session.id) == session.fence:
            self.store.forget(session.id)
        self.archive.finish(session.id, None)
        self._account(session)
        self.metrics.detached.set(self.detached_count())
        self._changed()

    def _account(self, session: Session) -> None:
        outcome = session.outcome.value if session.outcome else "unknown"
        self.metrics.sessions.labels(outcome=outcome).inc()
        stats = session.stats()
        if session.outcome is Outcome.DONE and stats["rtf"] is not None:
            self.metrics.rtf.observe(stats["rtf"])
        rate = session.spec.format.sample_rate
        log.info(
            # request_id comes from the client: quoted and escaped, so it cannot break the line.
            "session_end id=%s outcome=%s error=%s delivered=%s client=%s request_id=%s "
            "turns=%d/%d samples=%d audio_s=%.3f sent_s=%.3f ttfa_ms=%s rtf=%s wall_ms=%s "
            "queued_ms=%s",
            session.id,
            outcome,
            session.error.code if session.error else "-",
            "yes" if session.delivered else "no",
            session.spec.client,
            json.dumps(session.spec.request_id),
            session.counters.turns_done,
            session.feed.total,
            session.output.pts,
            session.output.pts / rate,
            session.counters.sent / rate,
            stats["ttfa_ms"],
            stats["rtf"],
            stats["wall_ms"],
            stats["queued_ms"],
        )

    async def take_over(self, session_id: str, token: str, last_seq: int) -> Session | None:
        """A session whose gateway died, resumed on this one (server/revive.py): None if the
        store is not shared, the token is wrong, or what it needs to go on is not there."""
        store = self.store
        if not store.shared or not store.token_matches(session_id, token):
            return None
        spec = await asyncio.to_thread(load_spec, store, session_id)
        going_on = await asyncio.to_thread(continuation, store, session_id, last_seq)
        if spec is None or going_on is None:
            return None
        session = self.create(spec, (session_id, token, going_on))
        try:
            await session.open()
        except ProtocolError as e:
            self.end(session, e)
            raise
        session.start_engine()
        log.info(
            "session %s taken over at turn %d, seq %d", session_id, going_on.turn, going_on.seq
        )
        return session

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def active_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.state in (State.OPENING, State.STREAMING))

    def detached_count(self) -> int:
        return sum(1 for s in self.sessions.values() if not s.attached)
