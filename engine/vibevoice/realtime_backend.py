"""VibeVoice-Realtime behind the engine's backend interface: every session a slot of one
`RealtimeEngine`, each turn spoken with its speaker's preset, its text taken as it arrives.

A session's life in the engine loop (`RealtimeRunner`): between turns it waits for the next
turn to be known; a turn starts from its speaker's preset; then windows, the reference's loop:
up to 5 text ids, then 6 frames; each window's ids are taken only once they are settled (5 of
them, or the turn's text is final: realtime_text.py), so text sent in pieces is spoken exactly
as the same text sent whole, and a session whose text has not arrived yet simply sits out the
steps (its listener hears a pause, nothing is repeated or lost). The turn ends after the frame
at which the EOS classifier fires, or when the window is full (`capped`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ...protocol.messages import Code, ProtocolError
from ..backend import Carry, SpeakerVoice, SynthesisParams, Turn, Voice, check_steps
from ..pipeline import TurnAudio, TurnEnded, TurnFeed, TurnStarted
from ..scheduler import Events, Runner
from .backend import capacity_of, weights_digest
from .config import SAMPLE_RATE
from .lm import KVCache, Qwen2
from .presets import Preset, PresetError, PresetStream, load_presets
from .realtime import SPEECH_WINDOW, TEXT_WINDOW, RealtimeRuntime
from .realtime_batch import Frame, Parked, RealtimeEngine, Session
from .realtime_text import TurnText, clean
from .weights import load_realtime

DEFAULT_CFG = 1.5  # the reference web demo's


@dataclass(eq=False)
class RealtimeSession:
    """What the server holds for a session (`open_session`): its slot, which moves when the
    session is parked and comes back, and the preset of each of its speakers."""

    slot: int
    voices: list[Preset]
    forced: int | None  # frames per turn (benchmarks: random weights end turns anywhere)
    state: Session  # the engine's record: generator and guidance scale


class RealtimeRunner:
    """One session's turns in a slot of the engine; its `group` runs every ready session's
    windows and frames in one unit."""

    def __init__(
        self,
        group: RealtimeGroup,
        session: RealtimeSession,
        feed: TurnFeed,
        replayed: Sequence[Carry] = (),
    ) -> None:
        self.group = group
        self.session = session
        self.feed = feed
        self.next = len(replayed)  # index of the next turn to start
        if replayed:  # the turn cache spoke turns 0..n-1: go on from their generator state
            session.state.gen.set_state(torch.from_numpy(replayed[-1]["rng"].copy()))
        self.turn: Turn | None = None  # the turn being spoken
        self.text: TurnText | None = None  # its settled ids
        self.taken = 0  # of those, how many windows have consumed
        self.left = 0  # frames left in the current window
        self.frames = 0  # frames made in this turn
        self.over = False
        self.parked: Parked | None = None  # the slot's state in host memory, while detached
        group.members[session.slot] = self

    @property
    def slot(self) -> int:
        return self.session.slot

    # -- what the engine loop asks ------------------------------------------------------------

    def ready(self) -> bool:
        if self.parked is not None and self.group.engine.free_slot() is None:
            return False  # back from a resume, waiting for a slot to come free
        if self.over:
            return True
        if self.turn is None:
            return self.feed.complete or self.feed.partial(self.next) is not None
        return self.left > 0 or self._window() is not None

    def run(self) -> Events | None:
        result = self.group.run([self])[self]
        if isinstance(result, BaseException):
            raise result
        return result

    def park(self) -> None:
        """Nobody is listening: free the slot, keep the state in host memory (loop thread)."""
        if self.parked is None and self.group.members.get(self.slot) is self:
            self.parked = self.group.engine.park(self.slot)
            del self.group.members[self.slot]

    def unpark(self) -> bool:
        """Back in a slot (the lowest free one); False while none is free."""
        if self.parked is None:
            return True
        slot = self.group.engine.free_slot()
        if slot is None:
            return False
        self.group.engine.unpark(self.parked, slot)
        self.session.slot, self.parked = slot, None
        self.group.members[slot] = self
        return True

    def close(self) -> None:
        """The session is over: free its slot (or drop its parked state)."""
        group = self.group
        if self.parked is None and group.members.get(self.slot) is self:
            del group.members[self.slot]
            group.engine.close(self.slot)
        self.parked = None

    # -- a unit --------------------------------------------------------------------------------

    def _window(self) -> list[int] | None:
        """The next window's ids once they are settled (possibly none: the text is spoken and
        the model speaks on until EOS), or None while the text is still to come."""
        assert self.turn is not None and self.text is not None
        known = self.feed.partial(self.turn.index)
        if known is not None:
            self.text.update(known[0].text, known[1])
        ids = self.text.ids[self.taken : self.taken + TEXT_WINDOW]
        if len(ids) == TEXT_WINDOW or self.text.final:
            return ids
        return None

    def prepare(self, events: Events) -> list[int] | None:
        """This step's window ids (often none) if the slot makes a frame, or None: it sits out."""
        engine = self.group.engine
        if self.turn is None:
            known = self.feed.partial(self.next)
            if known is None:  # ready() said so: the script is complete
                self.over = True
                return None
            turn = known[0]
            engine.start_turn(self.slot, self.session.voices[turn.speaker])
            self.turn, self.text = turn, TurnText(engine.rt.tok)
            self.taken = self.left = self.frames = 0
            self.next += 1
            events.append(TurnStarted(turn))
        ids: list[int] = []
        if self.left == 0:
            window = self._window()
            if window is None:
                return None
            if len(window) >= engine.room(self.slot):  # no room for the text and a frame
                self._end(events, capped=True)
                return None
            ids, self.taken, self.left = window, self.taken + len(window), SPEECH_WINDOW
        return ids

    def take(self, frame: Frame, events: Events) -> None:
        turn = self.turn
        assert turn is not None
        events.append(TurnAudio(turn.index, frame.audio))
        self.frames += 1
        self.left -= 1
        forced = self.session.forced
        if forced is not None:
            if self.frames >= forced:
                self._end(events, capped=False)
        elif frame.eos:
            self._end(events, capped=False)
        elif self.group.engine.room(self.slot) < 1:
            self._end(events, capped=True)

    def _end(self, events: Events, capped: bool) -> None:
        turn = self.turn
        assert turn is not None
        carry = {"rng": self.session.state.gen.get_state().numpy()}
        events.append(TurnEnded(turn.index, capped, carry))
        self.turn = self.text = None
        self.left = 0


class RealtimeGroup:
    """Every Realtime session of one engine loop: a unit is one engine step in which each given
    session takes its text window and makes a frame, or sits out."""

    def __init__(self, engine: RealtimeEngine) -> None:
        self.engine = engine
        self.members: dict[int, RealtimeRunner] = {}
        self.wake: Callable[[], None] = lambda: None  # the engine loop's, set when it adds us

    def run(self, runners: list[Runner]) -> dict[Runner, Events | None | BaseException]:
        out: dict[Runner, Events | None | BaseException] = {}
        windows: dict[int, list[int]] = {}
        for r in runners:
            assert isinstance(r, RealtimeRunner)
            events: Events = []
            out[r] = events
            if not r.unpark():  # ready() saw a free slot; a member before it may have taken it
                continue
            try:
                ids = r.prepare(events)
            except ProtocolError as e:  # this session's turn, not the batch's problem
                out[r] = e
                continue
            if ids is not None:
                windows[r.slot] = ids
            elif r.over and not events:
                out[r] = None
        for frame in self.engine.step(windows, list(windows)):
            member = self.members[frame.slot]
            got = out[member]
            assert isinstance(got, list)
            member.take(frame, got)
        return out


@torch.no_grad()
def random_preset(rt: RealtimeRuntime, length: int = 60) -> Preset:
    """A preset for a random-weight model (benchmarks): its own LMs run over a fixed text, as
    long as the released presets' prompts. Only for speed: it clones no voice."""
    ids = (rt.tok.encode("A voice prompt of a typical length, for timing. ") * length)[:length]

    def stream(lm: Qwen2, ids: list[int]) -> PresetStream:
        cache = KVCache.allocate(lm.cfg, 1, len(ids), rt.device, rt.dtype)
        x = lm.embed_tokens(torch.tensor([ids], device=rt.device))
        h = lm(x, torch.arange(len(ids), device=rt.device)[None], cache, slice(0, 1))[0]
        return PresetStream(h, cache.k[:, 0], cache.v[:, 0])

    m = rt.model.model
    lower, tts, pad = m.language_model, m.tts_language_model, rt.tok.pad
    long = ids + ids[: length // 2]  # the TTS LM's prompt also holds the prompt's speech
    return Preset(
        "random", stream(lower, ids), stream(tts, long), stream(lower, [pad]), stream(tts, [pad])
    )


class RealtimeBackend:
    """VibeVoice-Realtime-0.5B: presets as voices, text taken as it streams in."""

    modes = ("turns",)  # each turn from its speaker's preset: the model keeps no dialogue
    sample_rate = SAMPLE_RATE
    streams_text = True

    def __init__(
        self,
        rt: RealtimeRuntime,
        presets: dict[str, Preset],
        slots: int | None = None,
        window: int | None = None,
        steps: int = 5,
        graphs: bool | None = None,
    ) -> None:
        self.rt = rt
        self.name = rt.name
        cfg = rt.cfg
        for preset in presets.values():
            preset.check(
                cfg.tts.hidden_size,
                cfg.tts.num_key_value_heads,
                cfg.tts.head_dim,
                cfg.lm.num_hidden_layers,
                cfg.tts.num_hidden_layers,
            )
        self._presets = {name: p.to(rt.device, rt.dtype) for name, p in presets.items()}
        cuda = rt.device.type == "cuda"
        most = cfg.tts.max_position_embeddings
        window = min(window or (most if cuda else 2048), most)
        for name, p in self._presets.items():  # here, not when a turn starts in a shared step
            longest = max(s.length for s in p.streams().values())
            if longest + 64 > window:
                raise ValueError(
                    f"voice preset {name} holds {longest} positions, which leaves too little of "
                    f"the {window}-position window for speech; raise --context-window"
                )
        self.engine = RealtimeEngine(rt, slots or (64 if cuda else 8), window, steps, graphs)
        self.group = RealtimeGroup(self.engine)
        self._capacity = 1
        self._fingerprint = ""

    @staticmethod
    def load(
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        voices: str | None = None,
        slots: int | None = None,
        steps: int = 5,
        window: int | None = None,
    ) -> RealtimeBackend:
        if not voices and model.startswith("random:"):
            rt = load_realtime(model, device, dtype)
            return RealtimeBackend(rt, {"random": random_preset(rt)}, slots, window, steps)
        if not voices:
            raise ValueError(
                f"--model {model} is VibeVoice-Realtime, which speaks only with voice presets: "
                "pass --voices DIR, a directory of presets (the .pt files of the reference's "
                "demo/voices/streaming_model, or .safetensors from `vibecast voices convert`)"
            )
        try:
            presets = load_presets(Path(voices))
        except PresetError as e:
            raise ValueError(f"--voices {voices}: {e}") from None
        rt = load_realtime(model, device, dtype)
        return RealtimeBackend(rt, presets, slots, window, steps)

    @property
    def steps(self) -> int:
        return self.engine.steps

    def preset(self, name: str) -> Preset:
        """The preset a voice name stands for, on the engine's device and in its dtype."""
        return self._presets[name]

    def voices(self) -> list[Voice]:
        return [
            Voice(name, name, f"voice preset {name} ({p.tts_lm.length} prompt positions)")
            for name, p in self._presets.items()
        ]

    def check_params(self, params: SynthesisParams) -> None:
        if params.mode not in self.modes:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"options.mode {params.mode!r}: VibeVoice-Realtime speaks each turn on its own "
                "from its speaker's preset; leave options.mode out or send 'turns'.",
                field="options.mode",
            )
        check_steps(params, self.engine.steps)

    def open_session(
        self, speakers: list[SpeakerVoice], params: SynthesisParams
    ) -> RealtimeSession:
        voices = []
        for i, sp in enumerate(speakers):
            if sp.audio is not None or sp.voice_id not in self._presets:
                names = ", ".join(self._presets)
                raise ProtocolError(
                    Code.BAD_FIELD,
                    f"speakers[{i}]: VibeVoice-Realtime speaks only with its voice presets "
                    f"(no voice cloning); give `voice` one of: {names}.",
                    field=f"speakers[{i}].voice",
                )
            voices.append(self._presets[str(sp.voice_id)])
        slot = self.engine.free_slot()
        if slot is None:  # admission keeps sessions within the slots: a caller's bug
            raise RuntimeError("every slot of the Realtime engine is taken")
        cfg = params.cfg_scale if params.cfg_scale is not None else DEFAULT_CFG
        state = self.engine.open(slot, params.seed, cfg)
        return RealtimeSession(slot, voices, params.frames_per_turn, state)

    def check_turns(self, session: RealtimeSession, turns: list[Turn]) -> None:
        """A turn whose text alone leaves no room for speech in the window is refused."""
        for t in turns:
            preset = session.voices[t.speaker]
            ids = len(self.rt.tok.encode(clean(t.text).strip() + "\n"))
            # ~3 frames a token is generous for speech at this model's pace (2.5 words/s).
            need = preset.tts_lm.length + ids * 4
            if need > self.engine.window:
                raise ProtocolError(
                    Code.TOO_LONG,
                    f"turns[{t.index}] has {ids} text tokens; with the preset's "
                    f"{preset.tts_lm.length} positions and its speech it may need {need} "
                    f"positions, and this server holds {self.engine.window} per turn. Split the "
                    "turn into shorter ones.",
                    field=f"turns[{t.index}].text",
                    turn=t.index,
                )

    def close_session(self, session: RealtimeSession) -> None:
        """Free a session no runner took (a runner's `close` frees its own)."""
        if self.engine.sessions[session.slot] is session.state:
            self.engine.close(session.slot)

    def runner(
        self,
        session: RealtimeSession,
        feed: TurnFeed,
        replayed: Sequence[Carry] = (),
        within: Carry | None = None,
    ) -> RealtimeRunner:
        """`within` is not used: a turn starts again from its beginning, from the same
        generator state (the carry of the turn before it)."""
        return RealtimeRunner(self.group, session, feed, replayed)

    def fingerprint(self) -> str:
        if not self._fingerprint:
            e = self.engine
            settings = f"{e.steps}:{e.window}:{self.rt.dtype}:{self.rt.device.type}"
            self._fingerprint = weights_digest(self.name, self.rt.model, settings)
        return self._fingerprint

    def counters(self) -> dict[str, float]:
        return {
            "engine_frames": float(self.engine.frames),
            "engine_audio_seconds": self.engine.frames * 3200 / SAMPLE_RATE,
        }

    def seconds_per_char(self) -> float:
        return 0.085

    def warmup(self) -> None:
        """A short turn through the engine, then the step time: every step runs all slots, so
        one step's time says how many sessions keep up with real time."""
        if not self._presets:
            return
        name = next(iter(self._presets))
        params = SynthesisParams(0, "turns", DEFAULT_CFG, None, frames_per_turn=8)
        session = self.open_session([SpeakerVoice("warmup", voice_id=name)], params)
        runner = self.runner(session, TurnFeed([Turn(0, 0, "Warm up the engine.")]))
        self._capacity = capacity_of(runner, self.engine.max_slots, skip=1)  # 1: turn start
        self.fingerprint()

    def realtime_capacity(self) -> int:
        return self._capacity
