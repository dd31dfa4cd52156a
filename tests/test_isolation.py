"""One session's failure ends that session only: the error is `internal`, logged with the
session id, and a concurrent session's audio is exactly what it would have been alone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from conftest import running_server
from helpers import decode_session, run_session, speakers_of, turns_of

from vibecast.engine.scheduler import TurnRunner
from vibecast.protocol import Error


@dataclass
class Faulty:
    """The real Piper backend, except that a turn saying FAIL raises, and a turn saying OOM
    raises the error a CUDA allocator raises (simulated: there is no GPU here)."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def runner(self, session: Any, feed: Any, replayed: Any = ()) -> TurnRunner:
        return TurnRunner(self, session, feed, replayed)  # the engine loop calls our render

    def render(
        self, session: Any, encoded: Any, start: Any = None
    ) -> Generator[np.ndarray, None, None]:
        for i, chunk in enumerate(self.inner.render(session, encoded, start)):
            if i == 1 and "FAIL" in encoded.turn.text:
                raise RuntimeError("a bug in the middle of a turn")
            if i == 1 and "OOM" in encoded.turn.text:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield chunk


@pytest.fixture(scope="module")
def faulty(piper):
    with running_server(Faulty(piper)) as server:
        yield server


TURNS = turns_of()[:4]


@pytest.mark.parametrize("trigger", ["FAIL", "OOM"])
def test_a_failing_session_leaves_its_neighbour_intact(faulty, caplog, trigger: str) -> None:
    caplog.set_level(logging.ERROR, logger="vibecast.session")
    bad_turns = (
        TURNS[:1]
        + [{"speaker": 1, "text": f"This turn will {trigger} halfway through."}]
        + TURNS[2:]
    )

    async def together():
        return await asyncio.gather(
            run_session(faulty.ws_url, speakers_of(4), TURNS, options={"seed": 5}),
            run_session(faulty.ws_url, speakers_of(4), bad_turns, options={"seed": 6}),
        )

    good, bad = asyncio.run(together())
    alone = asyncio.run(run_session(faulty.ws_url, speakers_of(4), TURNS, options={"seed": 5}))

    err = [m for m in bad.messages if isinstance(m, Error)]
    assert len(err) == 1 and err[0].code == "internal" and err[0].fatal
    assert bad.ready.session_id in err[0].message
    assert ("out of memory" if trigger == "OOM" else "RuntimeError") in err[0].message
    assert bad.close_code == 1011
    assert "done" not in bad.kinds()
    assert any(bad.ready.session_id in r.getMessage() for r in caplog.records)

    assert good.kinds()[-1] == "done" and good.close_code == 1000
    np.testing.assert_array_equal(decode_session(good), decode_session(alone))

    # The server is fine afterwards.
    after = asyncio.run(run_session(faulty.ws_url, speakers_of(4), TURNS[:1]))
    assert after.kinds()[-1] == "done"
