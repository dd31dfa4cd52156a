"""Sessions with no socket (the HTTP API and jobs): opened through the same checks, queue and
engine loop as a WebSocket `start`; their messages read in order as they are made. Nothing to
resume on: a reader that stops early cancels its session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from ..protocol.messages import (
    Code,
    Error,
    ProtocolError,
    ServerMessage,
    Start,
    Unknown,
    parse_server,
)
from .session import OutFrame, Session, State
from .sessions import Sessions


async def _silent(position: int, eta: float | None) -> None:
    return None


async def open_session(
    hub: Sessions,
    start: Start,
    client: str,
    on_created: Callable[[Session], None] | None = None,
    on_position: Callable[[int, float | None], Awaitable[None]] = _silent,
    count: bool = True,
) -> Session:
    """Check, queue and open a session (ProtocolError if refused); it is generating on return.
    `count`: the start counts against the client's rate limit (a job's counted when submitted)."""
    if count:
        hub.check_rate(client)
    spec = await hub.validate(start, client)
    session = hub.create(spec)
    session.set_attached(True)  # its reader is its listener
    if on_created is not None:
        on_created(session)
    await hub.admit(session, on_position)
    if session.state is not State.QUEUED:  # ended while it waited (cancelled, shutdown)
        hub.end(session)
        raise ProtocolError(Code.BUSY, "the session ended before it was admitted.")
    try:
        await session.open()
    except ProtocolError as e:
        hub.end(session, refused=e)
        raise
    session.announced = True
    session.start_engine()
    return session


async def messages_of(hub: Sessions, session: Session) -> AsyncIterator[ServerMessage | Unknown]:
    """Everything the session sends, in order, up to its end; raises ProtocolError if it
    failed. Leaving early (the reader went away) cancels the session."""
    try:
        while True:
            frame: OutFrame = await session.next_frame()
            if frame.terminal:
                message = session.terminal_message()
                session.sent(frame)
                session.delivered = True
                hub.end(session)
                if isinstance(message, Error):
                    raise ProtocolError(Code(message.code), message.message)
                return  # done or cancelled: the reader sees the stream end
            session.sent(frame)
            assert frame.data is not None
            yield parse_server(frame.data)
    finally:
        if not session.delivered:
            session.cancel()
            session.delivered = True
            hub.end(session)
