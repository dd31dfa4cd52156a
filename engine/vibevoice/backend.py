"""VibeVoice behind the engine's backend interface: `turns` mode, every session a slot of one
batch engine stepped by the engine loop (`continuous` and the reference's layout: synth)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...protocol.messages import Code, ProtocolError
from ..backend import SpeakerVoice, SynthesisParams, Turn, Voice
from ..pipeline import TurnAudio, TurnEnded, TurnFeed, TurnStarted
from ..resample import resample
from ..scheduler import HEADROOM, Events, Runner
from ..voice_audio import decode_voice_audio
from .batch import BatchEngine, Parked, count_ops, decode_step
from .config import SAMPLE_RATE
from .generate import Runtime
from .weights import load_runtime

AUDIO_SUFFIXES = (".wav", ".ogg", ".opus")


def read_voice_file(path: Path, where: str) -> tuple[np.ndarray, int]:
    """A voice prompt from disk, checked like an upload; if bad, a ValueError naming `where`.

    The server's operator chose these files, so short prompts pass (the tiny parity fixtures'
    are 0.46 s); the 0.5 s minimum is a hint for people uploading a sample.
    """
    try:
        return decode_voice_audio(path.read_bytes(), min_seconds=0.1)
    except ProtocolError as e:
        raise ValueError(f"{where}: {e.message}") from None


def at_24k(audio: np.ndarray, rate: int) -> np.ndarray:
    return audio if rate == SAMPLE_RATE else resample(audio, rate, SAMPLE_RATE)


class SlotRunner:
    """One session's turns in a slot of the batch engine. The engine loop never runs it alone:
    its `group` runs one unit for every runnable session at once."""

    def __init__(self, group: BatchGroup, slot: int, feed: TurnFeed) -> None:
        self.group = group
        self.slot = slot
        self.feed = feed
        self.next = 0  # index of the next turn to start
        self.turn: Turn | None = None  # the turn being spoken
        self.parked: Parked | None = None  # the slot's state in host memory, while detached
        group.members[slot] = self

    def ready(self) -> bool:
        if self.parked is not None and self.group.engine.free_slot() is None:
            return False  # back from a resume, waiting for a slot to come free
        return self.turn is not None or self.feed.complete or self.feed.peek(self.next) is not None

    def park(self) -> None:
        """Nobody is listening: free the slot, keep the state in host memory (loop thread)."""
        if self.parked is None and self.group.members.get(self.slot) is self:
            self.parked = self.group.engine.park(self.slot)
            del self.group.members[self.slot]

    def unpark(self) -> bool:
        slot = self.group.engine.free_slot()
        if self.parked is None or slot is None:
            return self.parked is None
        self.group.engine.unpark(self.parked, slot)
        self.slot, self.parked = slot, None
        self.group.members[slot] = self
        return True

    def run(self) -> Events | None:
        result = self.group.run([self])[self]
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        self.group.leave(self)


class BatchGroup:
    """Every VibeVoice session of one engine loop. A unit: the text stage of each given session
    that starts a turn (a prefill), then one decode step in which every given session in a turn
    makes a frame; members the loop did not give (held by flow control) sit the step out."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self.members: dict[int, SlotRunner] = {}

    def leave(self, runner: SlotRunner) -> None:
        if runner.parked is None and self.members.get(runner.slot) is runner:
            self.engine.close(runner.slot)
            del self.members[runner.slot]
        runner.parked = None

    def run(self, runners: list[Runner]) -> dict[Runner, Events | None | BaseException]:
        out: dict[Runner, Events | None | BaseException] = {}
        stepping: set[int] = set()
        for r in runners:
            assert isinstance(r, SlotRunner)
            events: Events = []
            if not r.unpark():  # ready() saw a free slot; a member before it may have taken it
                out[r] = events
                continue
            if r.turn is None:
                turn = r.feed.peek(r.next)
                if turn is None:  # ready() said so: the script is complete
                    out[r] = None
                    continue
                try:
                    self.engine.begin_turn(r.slot, turn.speaker, turn.text, turn.index)
                except ProtocolError as e:  # this session's turn, not the batch's problem
                    out[r] = e
                    continue
                r.turn, r.next = turn, r.next + 1
                events.append(TurnStarted(turn))
            out[r] = events
            stepping.add(r.slot)
        for slot, member in self.members.items():
            if member.turn is not None:
                if slot in stepping:
                    self.engine.resume(slot)
                else:
                    self.engine.pause(slot)
        for frame in self.engine.step():
            member = self.members[frame.slot]
            assert member.turn is not None
            got = out[member]
            assert isinstance(got, list)
            if frame.audio is not None:
                got.append(TurnAudio(member.turn.index, frame.audio))
            if frame.done:
                got.append(TurnEnded(member.turn.index, capped=frame.capped))
                member.turn = None
        return out


class VibeVoiceBackend:
    """VibeVoice in `turns` mode, every session a slot of one batch engine (batch.py)."""

    modes = ("turns",)
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        rt: Runtime,
        name: str,
        voices: dict[str, np.ndarray],
        slots: int | None = None,
        window: int | None = None,
        steps: int = 10,
    ) -> None:
        self.rt = rt
        self.name = name
        self._voices = voices
        cuda = rt.device.type == "cuda"
        slots = slots or (64 if cuda else 8)
        window = min(window or (4096 if cuda else 2048), rt.cfg.lm.max_position_embeddings)
        self.engine = BatchEngine(rt, slots, window, steps)
        self.group = BatchGroup(self.engine)
        self._capacity = 1  # measured by warmup()

    @staticmethod
    def load(
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        voices: str | None = None,
        slots: int | None = None,
        steps: int = 10,
    ) -> VibeVoiceBackend:
        rt = load_runtime(model, device, dtype)
        catalogue: dict[str, np.ndarray] = {}
        if voices:
            folder = Path(voices)
            if not folder.is_dir():
                raise ValueError(f"--voices {voices}: not a directory")
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in AUDIO_SUFFIXES:
                    catalogue[f.stem] = at_24k(*read_voice_file(f, f"--voices {voices}: {f.name}"))
            if not catalogue:
                raise ValueError(f"--voices {voices}: no .wav, .ogg or .opus files in it")
        return VibeVoiceBackend(rt, rt.name, catalogue, slots, steps=steps)

    def voices(self) -> list[Voice]:
        return [
            Voice(name, name, f"voice prompt from {name} ({len(a) / SAMPLE_RATE:.1f} s)")
            for name, a in self._voices.items()
        ]

    def check_params(self, params: SynthesisParams) -> None:
        if params.mode not in self.modes:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"options.mode {params.mode!r} cannot stream; the server runs 'turns' (use "
                "`vibecast synth --mode continuous` for the reference's whole-script output).",
                field="options.mode",
            )
        steps = self.engine.steps
        if params.steps is not None and params.steps != steps:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"options.steps is {params.steps}, but this server runs every session with "
                f"{steps} diffusion steps (they share one batch); leave it out or send {steps}.",
                field="options.steps",
            )

    def open_session(self, speakers: list[SpeakerVoice], params: SynthesisParams) -> int:
        """A slot of the engine with the session's voice prefix in it."""
        slot = self.engine.free_slot()
        if slot is None:  # admission keeps sessions within the slots: a caller's bug
            raise RuntimeError("every slot of the batch engine is taken")
        # The server refuses names outside `voices()` before a session opens, so a miss here
        # is a caller's bug and a KeyError says so.
        wavs = [
            self._voices[str(sp.voice_id)] if sp.audio is None else at_24k(sp.audio, sp.audio_rate)
            for sp in speakers
        ]
        cfg = params.cfg_scale if params.cfg_scale is not None else 1.3
        self.engine.open(slot, wavs, params.seed, cfg, params.frames_per_turn)
        return slot

    def check_turns(self, session: int, turns: list[Turn]) -> None:
        for t in turns:
            self.engine.check_turn(session, t.speaker, t.text, t.index)

    def close_session(self, session: int) -> None:
        self.engine.close(session)

    def seconds_per_char(self) -> float:
        return 0.085

    def runner(self, session: int, feed: TurnFeed) -> SlotRunner:
        return SlotRunner(self.group, session, feed)

    def warmup(self) -> None:
        """Run a turn through the engine, then time a step: every step runs all slots (static
        shapes), so one step's time says how many sessions keep up with real time."""
        wav = np.zeros(SAMPLE_RATE, np.float32)
        wav[::97] = 0.1  # something the normaliser can scale
        params = SynthesisParams(0, "turns", 1.3, None, frames_per_turn=6)
        slot = self.open_session(
            [SpeakerVoice("warmup", audio=wav, audio_rate=SAMPLE_RATE)], params
        )
        runner = self.runner(slot, TurnFeed([Turn(0, 0, "Warm up.")]))
        times = []
        while True:
            start = time.perf_counter()
            if runner.run() is None:
                break
            times.append(time.perf_counter() - start)
        runner.close()
        step_s = sorted(times[1:])[len(times[1:]) // 2]  # the first unit also ran the prefill
        frame_s = 3200 / SAMPLE_RATE
        slots = self.engine.max_slots
        self._capacity = min(slots, max(1, int(slots * HEADROOM * frame_s / step_s)))

    def realtime_capacity(self) -> int:
        return self._capacity

    def ops_per_step(self) -> int:
        """Operations one decode step dispatches: the same whatever the number of sessions."""
        engine = self.engine
        return count_ops(lambda: decode_step(engine.w, engine.state))
