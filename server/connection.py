"""One WebSocket connection at /v1/stream, from handshake to close.

States: AWAITING_START -> (QUEUED) -> STREAMING -> CLOSED. A bad frame before `start` gets an
error and the connection keeps waiting (at most `idle_timeout_s` from the handshake, however
many frames arrive); a session that ends (done, cancelled, fatal error) is followed by the close.
A dropped socket detaches the session, which waits `resume_grace_s` for a `resume` on another
connection before it is stopped and freed; a resume that takes over a session whose old socket
still looks open closes that socket with CLOSE_TAKEN_OVER.

`run` is the connection's one error boundary: a refused request is a `ProtocolError` and is
answered where it happens; any other exception from the connection's tasks ends the session
with a fatal `internal` error and a log line naming it, so no exception drops a socket silently.

All sends go through one lock: the writer (audio, turn events, terminal messages), the reader
(appended, non-fatal errors) and the progress ticker share the socket.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..protocol.messages import (
    CLOSE_CODE,
    PROTOCOL,
    Append,
    Appended,
    Cancel,
    Code,
    Message,
    Playback,
    Progress,
    ProtocolError,
    Queued,
    Resume,
    Start,
    Text,
    parse_client,
)
from .session import OutFrame, Session, State
from .sessions import Sessions

log = logging.getLogger("vibecast.connection")

CLOSE_TAKEN_OVER = 4001  # a resume on another connection took this connection's session


class Phase(enum.Enum):
    AWAITING_START = "awaiting_start"
    QUEUED = "queued"
    STREAMING = "streaming"
    CLOSED = "closed"


class _Closed(Exception):
    """The socket is gone or has been closed by us."""


class Connection:
    def __init__(self, ws: WebSocket, hub: Sessions, client: str, model_name: str) -> None:
        self.ws = ws
        self.hub = hub
        self.client = client
        self.model_name = model_name
        self.limits = hub.limits
        self.phase = Phase.AWAITING_START
        self._send_lock = asyncio.Lock()
        self._epoch = 0  # which attachment of the session this connection is
        self.session: Session | None = None

    # -- sending ---------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            raise _Closed
        async with self._send_lock:
            try:
                await self.ws.send_bytes(data)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.phase = Phase.CLOSED
                raise _Closed from None

    async def send(self, message: Message) -> None:
        await self._send(message.pack())

    async def send_error(self, e: ProtocolError) -> None:
        self.hub.metrics.errors.labels(code=str(e.code)).inc()
        await self.send(e.to_message())
        if e.fatal:
            await self.close(e.close_code)

    async def close(self, code: int = 1000) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        async with self._send_lock:
            try:
                await self.ws.close(code)
            except (RuntimeError, OSError):
                pass

    # -- receiving -------------------------------------------------------------------------------

    async def _receive(self, deadline: float | None) -> bytes | None:
        """The next binary frame; None when the socket closed or `deadline` (monotonic) passed.
        Bad frames are answered here."""
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = await asyncio.wait_for(self.ws.receive(), timeout)
            except TimeoutError:
                await self.send_error(
                    ProtocolError(
                        Code.IDLE_TIMEOUT,
                        f"no start arrived within {self.limits.idle_timeout_s:.0f} s "
                        "(limits.idle_timeout_s); connect again when you have a script.",
                        fatal=True,
                    )
                )
                return None
            except (WebSocketDisconnect, RuntimeError):
                return None
            if msg["type"] == "websocket.disconnect":
                return None
            data = msg.get("bytes")
            if data is None:
                await self.send_error(
                    ProtocolError(
                        Code.BAD_MESSAGE,
                        "text frames are not part of vibecast.v1; send each message as a "
                        "binary frame holding one msgpack map.",
                    )
                )
                continue
            if len(data) > self.limits.max_frame_bytes:
                await self.send_error(
                    ProtocolError(
                        Code.TOO_BIG,
                        f"a frame of {len(data)} bytes is over limits.max_frame_bytes "
                        f"({self.limits.max_frame_bytes}); shorten voice_audio (a few seconds "
                        "of speech is enough) or split the script with append.",
                        fatal=True,
                    )
                )
                return None
            return data

    # -- the connection's life -------------------------------------------------------------------

    async def run(self) -> None:
        deadline = time.monotonic() + self.limits.idle_timeout_s  # for `start`, from the handshake
        try:
            while self.phase is Phase.AWAITING_START:
                data = await self._receive(deadline)
                if data is None:
                    return
                try:
                    msg = parse_client(data)
                    if isinstance(msg, Start):
                        await self._start(msg)
                    elif isinstance(msg, Resume):
                        await self._resume(msg)
                    else:
                        raise ProtocolError(
                            Code.NOT_STARTED,
                            f"{msg.type} before start: send start (or resume) first.",
                        )
                except ProtocolError as e:
                    await self.send_error(e)
        except _Closed:
            pass
        except Exception as e:  # noqa: BLE001 - the connection's boundary (see the docstring)
            await self._crash(e)
        finally:
            self.phase = Phase.CLOSED

    async def _crash(self, e: Exception) -> None:
        session = self.session
        name = session.id if session is not None else "(none yet)"
        log.error("session %s: the connection failed", name, exc_info=e)
        if session is not None and session.epoch == self._epoch:  # not taken over by a resume
            self.hub.crashed(session)
        kind = "out of memory" if isinstance(e, MemoryError) else type(e).__name__
        error = ProtocolError(
            Code.INTERNAL,
            f"the server failed while handling this connection ({kind}); this is a bug in "
            f"vibecast, logged as session {name}. Other sessions are not affected.",
            fatal=True,
        )
        try:
            await self.send_error(error)
        except _Closed:
            pass

    async def _start(self, start: Start) -> None:
        self.hub.check_rate(self.client)
        spec = await self.hub.validate(start, self.client)
        session = self.hub.create(spec)
        await self._attach(session, replay=None)

    async def _resume(self, resume: Resume) -> None:
        session = self.hub.get(resume.session_id)
        if session is None:  # with a shared store: a session whose gateway died
            session = await self.hub.take_over(
                resume.session_id, resume.resume_token, resume.last_seq
            )
        if session is None or not self.hub.store.token_matches(
            resume.session_id, resume.resume_token
        ):
            raise ProtocolError(
                Code.UNKNOWN_SESSION,
                "no session with that session_id and resume_token is waiting here; it ended, "
                f"its {self.hub.config.resume_grace_s:.0f} s resume grace ran out, or the token "
                "is wrong. Start a new session.",
                field="session_id",
            )
        replay = session.replay_after(resume.last_seq)
        if replay is None:
            raise ProtocolError(
                Code.UNKNOWN_SESSION,
                f"this session cannot continue after seq {resume.last_seq}: that audio was never "
                "sent, or is older than what the server keeps for resume. Start a new session.",
                field="last_seq",
            )
        await self._attach(session, replay=[f.data for f in replay])

    async def _attach(self, session: Session, replay: list[bytes] | None) -> None:
        self.session = session
        session.epoch += 1
        self._epoch = session.epoch
        previous, session.connection = session.connection, self
        if previous is not None and previous is not self:
            previous.taken_over()
        session.set_attached(True)
        if replay is not None:
            self.hub.reattached(session)
        self.hub.metrics.detached.set(self.hub.detached_count())
        tasks = {
            asyncio.create_task(self._read_loop(session)),
            asyncio.create_task(self._main(session, replay)),
            asyncio.create_task(self._tick(session)),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise what ended it
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if session.epoch == self._epoch:
                session.connection = None
                session.set_attached(False)
                self.hub.detached(session)

    def taken_over(self) -> None:
        """A resume on another connection took this one's session: close this socket."""
        asyncio.get_running_loop().create_task(self.close(CLOSE_TAKEN_OVER))

    async def _main(self, session: Session, replay: list[bytes] | None) -> None:
        if replay is None:
            self.phase = Phase.QUEUED

            async def queued(position: int, eta: float | None) -> None:
                await self.send(Queued(position, eta))

            await self.hub.admit(session, queued)
            if session.state is State.QUEUED:  # admitted
                try:
                    await session.open()
                except ProtocolError as e:
                    self.hub.end(session, refused=e)
                    self.session = None
                    await self.send_error(e)
                    self.phase = Phase.AWAITING_START
                    return
                self.phase = Phase.STREAMING
                await self.send(session.ready_message(self.model_name))
                session.announced = True
                session.start_engine()
        else:
            self.phase = Phase.STREAMING
            await self.send(session.ready_message(self.model_name))
            for data in replay:
                await self._send(data)
        await self._write_loop(session)

    async def _write_loop(self, session: Session) -> None:
        while session.epoch == self._epoch:
            frame: OutFrame = await session.next_frame()
            if session.epoch != self._epoch:  # a newer connection took the session over
                session.requeue(frame)
                break
            if session.fenced_out():  # another gateway took it over: it is that one's now
                self.hub.let_go(session)
                await self.close(CLOSE_TAKEN_OVER)
                raise _Closed
            data = session.terminal_message().pack() if frame.data is None else frame.data
            if frame.seq is not None:
                session.counters.last_sent_seq = frame.seq
            try:
                await self._send(data)
            except BaseException:  # the socket dropped, or this task was cancelled mid-send
                if frame.terminal:
                    session.requeue(frame)
                else:
                    session.sent(frame)  # it may have reached the client: keep it for resume
                raise
            session.sent(frame)
            metrics = self.hub.metrics
            if frame.seq is not None:
                metrics.audio_sent.inc(frame.samples / session.spec.format.sample_rate)
                if frame.seq == 0:
                    ttfa = session.counters.first_audio_at - session.counters.started
                    metrics.ttfa.observe(ttfa)
            if frame.terminal:
                session.delivered = True
                self.hub.end(session)
                code = 1000
                if session.error is not None:
                    code = CLOSE_CODE.get(Code(session.error.code), 1008)
                await self.close(code)
                raise _Closed

    async def _read_loop(self, session: Session) -> None:
        while True:
            data = await self._receive(None)
            if data is None or session.epoch != self._epoch:
                return  # closed, or a resume on another connection took the session over
            try:
                msg = parse_client(data, len(session.spec.speakers), session.feed.total)
                if isinstance(msg, Cancel):
                    session.cancel()
                elif isinstance(msg, Playback):
                    session.playback(msg.played_ms)
                    lead = session.sent_ms - msg.played_ms
                    if lead < 1000 and session.state is State.STREAMING:
                        self.hub.metrics.lead_low.inc()
                elif isinstance(msg, Append):
                    await self._append(session, msg)
                elif isinstance(msg, Text):
                    self._text(session, msg)
                else:
                    kind = "start" if isinstance(msg, Start) else "resume"
                    raise ProtocolError(
                        Code.ALREADY_STARTED,
                        f"{kind} on a connection that already has a session; one session per "
                        "connection. Open a new connection for another.",
                    )
            except ProtocolError as e:
                await self.send_error(e)

    async def _append(self, session: Session, msg: Append) -> None:
        feed = session.feed
        opened = feed.open_turn
        if not feed.more:
            last = (
                f"; turn {opened}, still open, is its last: send the rest of its text in text "
                "messages"
                if opened is not None
                else ""
            )
            raise ProtocolError(
                Code.BAD_MESSAGE,
                f"append after the script was complete (more was false){last}; start a new "
                "session for more turns.",
                field="more",
            )
        if msg.turns and opened is not None:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"turn {opened} is still open; finish its text with "
                f'{{type: "text", turn: {opened}, final: true}} first, then append the turns '
                "after it.",
                field="append.turns",
                turn=opened,
            )
        turns = self.hub.check_turns(msg.turns, feed.total, session.chars)
        open_last = bool(msg.turns) and bool(msg.turns[-1].stream)
        await self.send(Appended(session.append(turns, msg.more, open_last)))

    def _text(self, session: Session, msg: Text) -> None:
        """A piece of the open turn's text: checked like the text of an appended turn, then
        handed to the session (which wakes the engine). No reply unless it is refused."""
        if not session.announced:
            raise ProtocolError(
                Code.NOT_STARTED,
                "text before ready: the session is still waiting in the queue or opening; send "
                "text once ready has come (a start's open turn may carry the first words).",
                field="text.turn",
                turn=msg.turn,
            )
        feed = session.feed
        opened = feed.open_turn
        got = feed.partial(msg.turn)
        if msg.turn != opened or got is None:
            if opened is not None:
                why = f"turn {msg.turn} is not open; the open turn is {opened}"
            elif msg.turn in session.streamed and got is not None and got[1]:
                why = (
                    f"turn {msg.turn}'s text is final already (final: true came); open a new turn "
                    "with stream: true in an append for more text"
                )
            else:
                why = (
                    f"turn {msg.turn} is not open: no turn is; open one with stream: true on the "
                    "last turn of a start or an append"
                )
            raise ProtocolError(Code.BAD_FIELD, why + ".", field="text.turn", turn=msg.turn)
        before = got[0].text
        if msg.final and not before.strip() and not msg.text.strip():
            raise ProtocolError(
                Code.BAD_FIELD,
                f"text.text: turn {msg.turn} has nothing to say yet; send its words before "
                "final: true.",
                field="text.text",
                turn=msg.turn,
            )
        self.hub.check_piece(before, msg.text, session.chars, msg.turn)
        session.write(msg.turn, msg.text, msg.final)

    async def _tick(self, session: Session) -> None:
        """About once a second: progress, and the idle check for open scripts."""
        while True:
            await asyncio.sleep(1.0)
            if session.state is not State.STREAMING or self.phase is not Phase.STREAMING:
                continue
            c = session.counters
            audio_s = session.counters.generated / session.spec.format.sample_rate
            lead = session.sent_ms - c.played_ms if c.played_ms is not None else None
            await self.send(
                Progress(
                    generated_ms=session.generated_ms,
                    sent_ms=session.sent_ms,
                    turns_done=c.turns_done,
                    turns_total=session.feed.total,
                    rtf=round(c.engine_busy_s / audio_s, 4) if audio_s else 0.0,
                    lead_ms=lead,
                )
            )
            feed = session.feed
            opened = feed.open_turn
            final = feed.total - (opened is not None)  # an open turn waits for its text
            waiting = not feed.complete and c.turns_done >= final
            idle_s = time.monotonic() - session.touched
            if waiting and idle_s > self.limits.idle_timeout_s:
                limit = f"{self.limits.idle_timeout_s:.0f} s (limits.idle_timeout_s)"
                session.fail(
                    Code.IDLE_TIMEOUT,
                    f"turn {opened} is open (stream: true) but no text came for {limit}; send "
                    "its text as it comes, and final: true to end it."
                    if opened is not None
                    else f"the script is open (more: true) but no append came for {limit}; "
                    "send append with more: false to finish a script.",
                )


def chosen_subprotocol(ws: WebSocket) -> str | None:
    offered: Any = ws.scope.get("subprotocols") or []
    return PROTOCOL if PROTOCOL in offered else None
