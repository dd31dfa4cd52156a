"""VibeVoice behind the engine's backend interface: `turns` mode, every session a slot of one
batch engine stepped by the engine loop (`continuous` and the reference's layout: synth)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...protocol.messages import Code, ProtocolError
from ..backend import Carry, SpeakerVoice, SynthesisParams, Turn, Voice, check_steps
from ..pipeline import PipelineEvent, TurnAudio, TurnEnded, TurnFeed, TurnStarted
from ..resample import resample
from ..scheduler import HEADROOM, Events, Runner
from ..voice_audio import decode_voice_audio
from .batch import BatchEngine, EncodedTurn, Parked, SlotFrame, count_ops, decode_step
from .config import SAMPLE_RATE
from .context import Saved, TurnRecord, Window, record_carry
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
    its `group` runs one unit for every runnable session at once.

    `turns` mode: each turn is its text block after the prefix, ended by the model's
    speech_end. `context` mode (context.py): the turns follow each other in one context, and
    at each boundary the slot either goes on in place or has its context rebuilt (a prefill
    job on the group's prefill worker: the other sessions keep stepping meanwhile)."""

    def __init__(
        self, group: BatchGroup, slot: int, feed: TurnFeed, saved: Saved | None = None
    ) -> None:
        self.group = group
        self.slot = slot
        self.feed = feed
        engine = group.engine
        sess = engine.sessions[slot]
        assert sess is not None
        self.window = (
            Window(engine.rt.tok, engine.window, sess.prefix_len) if sess.context else None
        )
        self.forced = sess.frames_per_turn is not None
        self.next = 0  # index of the next turn to start
        self.turn: Turn | None = None  # the turn being spoken
        self.capped = False  # that turn reached its frame cap
        self.cut = False  # context: the server closed that turn's segment for the model's eos
        self.held: Turn | None = None  # context: a turn over whose end waits for the script
        self.pending: Future[EncodedTurn] | None = None  # a prefill job for the next turn
        self.parked: Parked | None = None  # the slot's state in host memory, while detached
        self.over = False
        group.members[slot] = self
        if saved is not None:
            self._restore(saved, sess.gen)

    def save(self) -> Saved:
        """A context session between turns as plain data (context.py's `Saved`): another
        engine, in another process, rebuilds it from this and the session's start request."""
        if self.window is None or self.turn or self.held or self.pending or self.over:
            raise ValueError("only a context session between two turns can be saved")
        sess = self.group.engine.sessions[self.slot]
        assert sess is not None
        return self.window.save(self.next, sess.gen.get_state())

    def _restore(self, saved: Saved, gen: torch.Generator) -> None:
        if self.window is None:
            if saved.records:
                raise ValueError("a saved context needs a session opened in context mode")
        else:
            self.window.restore(saved)
        gen.set_state(saved.rng)  # after the voice prompts' draws, where the session was
        self.next = saved.next

    def ready(self) -> bool:
        if self.parked is not None and self.group.engine.free_slot() is None:
            return False  # back from a resume, waiting for a slot to come free
        if self.pending is not None:
            return self.pending.done()
        if self.turn is not None or self.over:
            return True
        return self.feed.complete or self.feed.peek(self.next) is not None

    def park(self) -> None:
        """Nobody is listening: free the slot, keep the state in host memory (loop thread)."""
        if self.parked is None and self.group.members.get(self.slot) is self:
            if self.pending is not None:
                self.pending.exception()  # the prefill writes the session's cache: let it end
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

    # -- a unit, before the step: True if the slot takes part in it ----------------------------

    def prepare(self, events: Events) -> bool:
        engine = self.group.engine
        if self.pending is not None:
            enc = self.pending.result()
            self.pending = None
            enc.slot = self.slot  # the session may have been parked and come back elsewhere
            first = enc.first
            if self.window is not None:
                self.window.rebuilt(*self.group.planned.pop(self), enc.length)
                self.window.records.append(TurnRecord())
                if enc.turn > 0:
                    self.group.rebuilds += 1
                    self.group.rebuild_s += enc.prefill_s
                first = self._first(enc.first, enc.turn)
            engine.start_turn(enc, first)
            return True
        if self.turn is not None:
            return True
        if self.held is not None:  # a context turn over, its end held until the script grew
            if self.feed.peek(self.next) is None and not self.cut and not self.capped:
                # The script ended there: the model speaks on in the last turn (module doc).
                self.turn, self.held = self.held, None
                engine.go_on(self.slot, None, engine.next_token(self.slot))
                return True
            self._ended(self.held, events, self.capped)
            self.held = None
        turn = self.feed.peek(self.next)
        if turn is None:  # ready() said so: the script is complete
            self.over = True
            return False
        ids, cap = engine.check_turn(self.slot, turn.speaker, turn.text, turn.index)
        self.turn, self.next, self.capped, self.cut = turn, self.next + 1, False, False
        events.append(TurnStarted(turn))
        if self.window is None:
            self._prefill(ids, None, [], turn.index, cap)
            return False
        lines = [(t.speaker, t.text) for t in self.feed.known()]
        planned = self.window.plan(lines, turn.index, cap)
        if planned is None:
            self.window.records.append(TurnRecord())
            first = self._first(engine.next_token(self.slot), turn.index)
            engine.go_on(self.slot, cap, first)
            return True
        self.group.planned[self] = planned
        self._prefill(*self.window.inputs(lines, *planned, turn.index), turn.index, cap)
        return False

    def _prefill(
        self, ids: list[int], frames: Tensor | None, at: list[int], turn: int, cap: int
    ) -> None:
        group = self.group
        self.pending = group.prefill.submit(
            group.engine.encode,
            self.slot,
            ids,
            frames,
            at,
            turn=turn,
            max_frames=cap,
            stream=group.stream,
        )
        self.pending.add_done_callback(lambda _: group.wake())

    def _first(self, chosen: int, k: int) -> int:
        """A context turn's first token: a turn after the first opens a segment."""
        tok = self.group.engine.rt.tok
        if k > 0 and (self.forced or chosen in (tok.eos, tok.speech_end)):
            return tok.speech_start
        if chosen == tok.eos and self._more():  # eos in the first segment, lines to come
            return tok.speech_end
        return chosen

    def _more(self) -> bool:
        return not self.feed.complete or self.feed.peek(self.next) is not None

    def _ended(self, turn: Turn, events: Events, capped: bool) -> None:
        """Turn over: its end, with what a later session needs to go on after it (turn cache)."""
        sess = self.group.engine.sessions[self.slot]
        assert sess is not None
        carry: Carry = {"rng": sess.gen.get_state().numpy()}
        if self.window is not None:
            hidden = self.group.engine.rt.cfg.lm.hidden_size
            carry |= record_carry(self.window.records[-1], hidden)
        events.append(TurnEnded(turn.index, capped=capped, carry=carry))

    # -- a unit, after the step ----------------------------------------------------------------

    def take(self, frame: SlotFrame, events: Events) -> None:
        turn = self.turn
        assert turn is not None
        if frame.audio is not None:
            events.append(TurnAudio(turn.index, frame.audio))
        self.capped |= frame.capped
        if self.window is None:
            if frame.done:
                self._ended(turn, events, frame.capped)
                self.turn = None
            return
        engine = self.group.engine
        if not frame.ended:
            self.window.consumed(frame.token, frame.input)
        if frame.ended:  # eos with nothing left to say: the session's speech is over
            self._ended(turn, events, self.capped)
            self.turn, self.over = None, True
        elif frame.boundary:
            self.turn = None
            if self.feed.peek(self.next) is not None:
                self._ended(turn, events, self.capped)
            elif self.feed.complete and (self.capped or self.cut or self.forced):
                self._ended(turn, events, self.capped)
                self.over = True
            else:
                self.held = turn  # run on (complete) or wait for more lines (prepare)
        elif engine.next_token(self.slot) == engine.rt.tok.eos and self._more():
            engine.set_next(self.slot, engine.rt.tok.speech_end)  # the model ended too early
            self.cut = True


def drive(runner: Runner) -> Iterator[PipelineEvent]:
    """A session's events with nobody else in the engine, unit after unit, waiting for its
    prefills (offline synthesis, warm-up); the session is closed at the end."""
    try:
        while (events := runner.run()) is not None:
            yield from events
    finally:
        runner.close()


def capacity_of(runner: Runner, slots: int, skip: int) -> int:
    """Sessions that keep up with real time, from a warm-up turn run alone: every step runs all
    `slots` (static shapes), so the median unit after the first `skip` says it."""
    times = []
    while True:
        start = time.perf_counter()
        if runner.run() is None:
            break
        times.append(time.perf_counter() - start)
    runner.close()
    steady = sorted(times[skip:]) or [1.0]
    step_s = steady[len(steady) // 2]
    frame_s = 3200 / SAMPLE_RATE
    return min(slots, max(1, int(slots * HEADROOM * frame_s / step_s)))


def weights_digest(name: str, model: torch.nn.Module, settings: str) -> str:
    """A backend's fingerprint: a sample of every tensor (cheap, and random checkpoints differ)
    and the settings that shape the numbers."""
    digest = hashlib.sha256(name.encode())
    for key, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy()
        digest.update(f"{key}{tuple(p.shape)}{p.dtype}".encode() + sample.tobytes())
    digest.update(settings.encode())
    return f"{name}:{digest.hexdigest()}"


class BatchGroup:
    """Every VibeVoice session of one engine loop. A unit: one decode step in which every given
    session in a turn makes a frame; members the loop did not give (held by flow control, or
    waiting for a prefill) sit the step out. Prefills (a turn's text, a context rebuild) run on
    one worker thread (and its own CUDA stream), so a long one never stalls the others."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self.members: dict[int, SlotRunner] = {}
        self.planned: dict[SlotRunner, tuple[int, int]] = {}  # context windows being rebuilt
        self.prefill = ThreadPoolExecutor(1, thread_name_prefix="vibevoice-prefill")
        cuda = engine.rt.device.type == "cuda"
        self.stream = torch.cuda.Stream(engine.rt.device) if cuda else None
        self.wake: Callable[[], None] = lambda: None  # the engine loop's, set when it adds us
        self.rebuilds = 0  # context rebuilds (not counting each session's first context)
        self.rebuild_s = 0.0  # their prefill time
        self.frames = 0  # frames made, every session together

    def leave(self, runner: SlotRunner) -> None:
        if runner.parked is None and self.members.get(runner.slot) is runner:
            self.engine.close(runner.slot)
            del self.members[runner.slot]
        runner.parked = None
        self.planned.pop(runner, None)

    def run(self, runners: list[Runner]) -> dict[Runner, Events | None | BaseException]:
        out: dict[Runner, Events | None | BaseException] = {}
        stepping: set[int] = set()
        for r in runners:
            assert isinstance(r, SlotRunner)
            events: Events = []
            out[r] = events
            if not r.unpark():  # ready() saw a free slot; a member before it may have taken it
                continue
            try:
                if r.prepare(events):
                    stepping.add(r.slot)
                elif r.over:
                    out[r] = None if not events else events
            except ProtocolError as e:  # this session's turn, not the batch's problem
                out[r] = e
        for slot, member in self.members.items():
            if member.turn is not None:
                if slot in stepping:
                    self.engine.resume(slot)
                else:
                    self.engine.pause(slot)
        for frame in self.engine.step():
            self.frames += frame.audio is not None
            member = self.members[frame.slot]
            got = out[member]
            assert isinstance(got, list)
            member.take(frame, got)
        return out


class VibeVoiceBackend:
    """VibeVoice in `turns` mode, every session a slot of one batch engine (batch.py)."""

    modes = ("context", "turns")  # the first is the default (docs/modes.md)
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
        # 2560 on a GPU: cloned voices drift after 4-5 minutes in one context (MS#106) and long
        # passages speed up (MS#57), so a window holds at most ~4 min of speech (~1800 frames
        # beside a 4-voice prefix and the text block), and about half that after a rebuild;
        # 1.5B bf16: 146 MB of KV per slot. docs/modes.md has the figures.
        window = min(window or (2560 if cuda else 2048), rt.cfg.lm.max_position_embeddings)
        self.engine = BatchEngine(rt, slots, window, steps)
        self.group = BatchGroup(self.engine)
        self._capacity = 1  # measured by warmup()
        self._fingerprint = ""

    @staticmethod
    def load(
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        voices: str | None = None,
        slots: int | None = None,
        steps: int = 10,
        window: int | None = None,
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
        return VibeVoiceBackend(rt, rt.name, catalogue, slots, window, steps)

    @property
    def steps(self) -> int:
        """Diffusion steps of every session (they share one batched step)."""
        return self.engine.steps

    def voices(self) -> list[Voice]:
        return [
            Voice(name, name, f"voice prompt from {name} ({len(a) / SAMPLE_RATE:.1f} s)")
            for name, a in self._voices.items()
        ]

    def check_params(self, params: SynthesisParams) -> None:
        if params.mode not in self.modes:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"options.mode {params.mode!r} is not one of 'context' (the default: every turn "
                "in the context of the dialogue so far) or 'turns' (each turn on its own); "
                "'continuous' is `vibecast synth`'s whole-script window.",
                field="options.mode",
            )
        check_steps(params, self.engine.steps)

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
        context = params.mode == "context"
        self.engine.open(slot, wavs, params.seed, cfg, params.frames_per_turn, context=context)
        return slot

    def check_turns(self, session: int, turns: list[Turn]) -> None:
        for t in turns:
            self.engine.check_turn(session, t.speaker, t.text, t.index)

    def close_session(self, session: int) -> None:
        self.engine.close(session)

    def counters(self) -> dict[str, float]:
        return {
            "context_rebuilds": float(self.group.rebuilds),
            "context_rebuild_seconds": self.group.rebuild_s,
            "engine_frames": float(self.group.frames),
            "engine_audio_seconds": self.group.frames * 3200 / SAMPLE_RATE,
        }

    def seconds_per_char(self) -> float:
        return 0.085

    def runner(
        self,
        session: int,
        feed: TurnFeed,
        replayed: Sequence[Carry] = (),
        within: Carry | None = None,
        saved: Saved | None = None,
    ) -> SlotRunner:
        """`replayed`: the carries of the turns already spoken (`within` is ignored: a turn
        starts again from its beginning, from the same generator state); `saved`: a context
        session saved elsewhere (`SlotRunner.save`). Either way the session was opened here
        with the same voices and seed, and goes on at its next turn (in `context` mode after
        a rebuild of its context from the turns' records)."""
        if replayed:
            sess = self.engine.sessions[session]
            assert sess is not None
            if sess.context:
                saved = Saved.from_carries(replayed, self.engine.window, self.rt.dtype)
            else:
                rng = torch.from_numpy(replayed[-1]["rng"].copy())
                saved = Saved(len(replayed), len(replayed), [], rng)
        return SlotRunner(self.group, session, feed, saved)

    def fingerprint(self) -> str:
        """The weights (a sample of every tensor: cheap, and random checkpoints differ), and
        what else shapes the numbers: steps, window, dtype, device kind."""
        if not self._fingerprint:
            self._fingerprint = self._digest()
        return self._fingerprint

    def _digest(self) -> str:
        e = self.engine
        settings = f"{e.steps}:{e.window}:{self.rt.dtype}:{self.rt.device.type}"
        return weights_digest(self.name, self.rt.model, settings)

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
        # The first units waited for the prefill.
        self._capacity = capacity_of(runner, self.engine.max_slots, skip=2)
        self.fingerprint()  # now, not from a request's thread while the loop steps

    def realtime_capacity(self) -> int:
        return self._capacity

    def ops_per_step(self) -> int:
        """Operations one decode step dispatches: the same whatever the number of sessions."""
        engine = self.engine
        return count_ops(lambda: decode_step(engine.w, engine.state))
