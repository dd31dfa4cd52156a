"""Voice presets of VibeVoice-Realtime-0.5B, read without running any code from the file.

The Realtime model has no voice encoder: a voice is a cached prefix. A preset holds, for each of
the four streams the generator keeps (the positive lower LM `lm`, the positive TTS LM `tts_lm`
and their negative twins for classifier-free guidance, `neg_lm` and `neg_tts_lm`), the last
hidden states of the prompt and the key/value cache the prompt left behind:

    lm, neg_lm          hidden [L, 896]   K, V [4 layers, 2 KV heads, L, 64]
    tts_lm, neg_tts_lm  hidden [L, 896]   K, V [20 layers, 2 KV heads, L, 64]

(sizes of the released model; the negative streams have L = 1).

Microsoft ships presets as `torch.save` files of transformers objects (a dict of four
`BaseModelOutputWithPast`, each holding a `DynamicCache`) and loads them with
`torch.load(weights_only=False)`, i.e. plain unpickling. A pickle is a program: every class or
function it names is imported and called, so a crafted preset runs whatever its author wants
(`os.system`, `builtins.open`, ...) the moment it is loaded. Voice files get passed around,
so we never let a preset's pickle name anything we have not vetted: the unpickler below resolves
names only from a short allow-list, in which every entry maps to an inert stand-in of ours
(transformers is not imported, and need not be installed), and it refuses anything else before
it could be called. Tensor data is read as raw bytes from the archive, on the CPU, whatever
device the file was saved from. `torch.load` is not used at all, not even with
`weights_only=True`, which would refuse the transformers classes anyway.

`vibecast voices convert` turns a preset into a `.safetensors` file of ours (`save_preset`): plain
tensors and a header, nothing to execute.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import secrets
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

ENTRIES = ("lm", "tts_lm", "neg_lm", "neg_tts_lm")
FORMAT = "vibecast-realtime-preset"  # the safetensors metadata that marks our files
VERSION = "1"
SUFFIXES = (".pt", ".safetensors")

# What a preset weighs: the released ones are 2-4 MB (tensors of a few hundred positions) with a
# 10 kB pickle (its size grows with the number of tensors, 100, not with their length). The caps
# only keep a hostile archive from making us allocate gigabytes for one "tensor" or for the
# unpickler's memo; a preset of the full 8192-position context stays far below them.
_MAX_PICKLE_BYTES = 1 << 20
_MAX_STORAGE_BYTES = 256 << 20

# The opcodes torch.save (pickle protocol 2, its default) writes for a preset, and the few more
# protocol 4 would use for the same objects. Checked before unpickling, with pickletools, which
# only parses: anything else (INST, OBJ, EXT*, NEWOBJ_EX, BINBYTES, ...) is not a preset's.
_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK", "NONE", "NEWTRUE", "NEWFALSE",
        "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE",
        "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS",
        "EMPTY_DICT", "SETITEM", "SETITEMS", "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET",
        "LONG_BINGET", "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD", "BINPERSID",
    }
)  # fmt: skip
_MEMO_OPCODES = frozenset({"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"})

_EXPECTED_FILES = (
    "voice presets of VibeVoice-Realtime-0.5B: *.pt files as shipped in VibeVoice's "
    "demo/voices/streaming_model/, or *.safetensors made from them by `vibecast voices convert`"
)


class PresetError(ValueError):
    """A preset file that is missing, damaged, of the wrong shape, or not a preset at all."""


# --- the result ---------------------------------------------------------------------------------


def _stream_problem(hidden: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """What is wrong with one stream's tensors, phrased to follow the stream's name; None if ok."""
    if hidden.ndim != 2:
        return f"its hidden state has shape {list(hidden.shape)}, not [positions, hidden]"
    if k.ndim != 4:
        return f"its keys have shape {list(k.shape)}, not [layers, kv_heads, positions, head_dim]"
    if v.shape != k.shape:
        return f"its values have shape {list(v.shape)} but its keys {list(k.shape)}"
    if k.shape[0] == 0:
        return "its cache has no layers"
    if k.shape[2] != hidden.shape[0]:
        return (
            f"its hidden state covers {hidden.shape[0]} positions but its cache {k.shape[2]}; "
            "they come from the same prompt and must agree"
        )
    if hidden.shape[0] == 0:
        return "it is empty (0 positions)"
    if not (hidden.dtype == k.dtype == v.dtype):
        return f"it mixes dtypes (hidden {hidden.dtype}, keys {k.dtype}, values {v.dtype})"
    if not hidden.is_floating_point():
        return f"its tensors are {hidden.dtype}, not floating point"
    return None


@dataclass
class PresetStream:
    """One cached prefix: what a prompt of `length` positions left in one of the four streams."""

    hidden: torch.Tensor  # (L, H): the stream's last hidden states (last_hidden_state[0])
    k: torch.Tensor  # (layers, kv_heads, L, head_dim): the cache's keys, layer by layer
    v: torch.Tensor  # (layers, kv_heads, L, head_dim): the values, likewise

    def __post_init__(self) -> None:
        problem = _stream_problem(self.hidden, self.k, self.v)
        if problem:
            raise PresetError(f"a preset stream is malformed: {problem}")

    @property
    def length(self) -> int:
        """Positions in the prefix (L)."""
        return int(self.hidden.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PresetStream:
        return PresetStream(
            self.hidden.to(device=device, dtype=dtype),
            self.k.to(device=device, dtype=dtype),
            self.v.to(device=device, dtype=dtype),
        )


@dataclass
class Preset:
    """A voice: the cached prefixes of the four streams the Realtime generator runs."""

    name: str  # the file's stem, e.g. "en-Davis_man": the voice's name on the server
    lm: PresetStream  # positive lower (text) LM
    tts_lm: PresetStream  # positive TTS LM
    neg_lm: PresetStream  # negative lower LM (CFG); length 1 in the released presets
    neg_tts_lm: PresetStream  # negative TTS LM (CFG); length 1 in the released presets

    def streams(self) -> dict[str, PresetStream]:
        return {e: getattr(self, e) for e in ENTRIES}

    def check(
        self, hidden: int, kv_heads: int, head_dim: int, lm_layers: int, tts_layers: int
    ) -> None:
        """Raises PresetError unless every stream fits a model of these sizes (a preset made for
        another model would otherwise fail deep inside attention, or worse, run on garbage)."""
        for entry, s in self.streams().items():
            tts = entry.endswith("tts_lm")
            layers, which = (tts_layers, "TTS LM") if tts else (lm_layers, "lower LM")
            if s.k.shape[0] != layers:
                raise PresetError(
                    f"preset {self.name}: {entry} has {s.k.shape[0]} layers; "
                    f"this model's {which} has {layers}"
                )
            if s.hidden.shape[1] != hidden:
                raise PresetError(
                    f"preset {self.name}: {entry} has hidden size {s.hidden.shape[1]}; "
                    f"this model's is {hidden}"
                )
            if (s.k.shape[1], s.k.shape[3]) != (kv_heads, head_dim):
                raise PresetError(
                    f"preset {self.name}: {entry} has {s.k.shape[1]} KV heads of {s.k.shape[3]}; "
                    f"this model has {kv_heads} of {head_dim}"
                )

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Preset:
        return Preset(self.name, *(s.to(device, dtype) for s in self.streams().values()))


# --- stand-ins for the classes a preset's pickle names ------------------------------------------
#
# Everything the unpickler can reach is one of these classes, the builtin containers and
# collections.OrderedDict. None of them does more than store what it is given; the tensors are
# built afterwards (_tensor), from records checked field by field. The classes are sealed: a
# pickle can send BUILD to a class object it got from find_class, which would set attributes on
# the class itself (for every later load in this process); the metaclass refuses that.


class _Sealed(type):
    def __setattr__(cls, name: str, value: Any) -> None:
        raise PresetError(f"the pickle tries to change the class {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise PresetError(f"the pickle tries to change the class {cls.__name__}")


class _StorageKind(metaclass=_Sealed):
    """torch.<X>Storage named in a persistent id: a dtype tag, never instantiated."""

    dtype: torch.dtype
    numpy_int: str  # an integer type of the same width, to read (and byte-swap) the raw bytes

    def __new__(cls, *args: Any, **kwargs: Any) -> _StorageKind:
        raise PresetError(f"the pickle calls torch.{cls.__name__[1:]}, which a preset never does")


class _FloatStorage(_StorageKind):
    dtype = torch.float32
    numpy_int = "i4"


class _HalfStorage(_StorageKind):
    dtype = torch.float16
    numpy_int = "i2"


class _BFloat16Storage(_StorageKind):
    dtype = torch.bfloat16
    numpy_int = "i2"


class _Storage(metaclass=_Sealed):
    """The flat data of one `data/<key>` entry of the archive, as a 1-D CPU tensor."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data


class _TensorRecord(metaclass=_Sealed):
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    backward_hooks[, metadata]): kept as a record; _tensor checks it and makes the tensor."""

    def __init__(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        metadata: Any = None,
    ) -> None:
        self.args = (storage, offset, size, stride, requires_grad, backward_hooks, metadata)


_OUTPUT_FIELDS = ("last_hidden_state", "past_key_values", "hidden_states", "attentions")


class _ModelOutput(metaclass=_Sealed):
    """transformers.modeling_outputs.BaseModelOutputWithPast. The real class is a dataclass
    deriving from OrderedDict; transformers' ModelOutput.__reduce__ pickles it as REDUCE with the
    fields in order, then SETITEMS with the non-None fields, then BUILD with the instance dict."""

    def __init__(self, *fields: Any) -> None:
        if len(fields) > len(_OUTPUT_FIELDS):
            raise PresetError(f"BaseModelOutputWithPast called with {len(fields)} fields")
        self.fields: dict[str, Any] = dict(zip(_OUTPUT_FIELDS, fields, strict=False))

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in _OUTPUT_FIELDS:
            raise PresetError(f"BaseModelOutputWithPast has no field {key!r}")
        self.fields[key] = value

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise PresetError("BaseModelOutputWithPast's state is not a dict")
        if not hasattr(self, "fields"):  # made by NEWOBJ, which skips __init__
            self.fields = {}
        for key, value in state.items():
            self[key] = value


class _DynamicCache(metaclass=_Sealed):
    """transformers.cache_utils.DynamicCache as of transformers 4.51: NEWOBJ with no arguments,
    then BUILD with {"_seen_tokens": L, "key_cache": [K per layer], "value_cache": [V ...]}."""

    state: dict[str, Any] | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise PresetError("DynamicCache's state is not a dict")
        self.state = dict(state)


_STORAGE_KINDS: tuple[type[_StorageKind], ...] = (_BFloat16Storage, _FloatStorage, _HalfStorage)

# Exactly what a preset may name, as (module, name) in the pickle. The released presets name the
# first five entries below plus torch.BFloat16Storage; presets saved on a CPU in float32 or fp16
# name the other storage types. Nothing else is looked up: not by prefix, not by attribute path
# (pickle protocol 4 allows "a.b" names), so `torch._utils._rebuild_parameter`,
# `copyreg._reconstructor` and the like are refused too.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorRecord,
    ("transformers.modeling_outputs", "BaseModelOutputWithPast"): _ModelOutput,
    ("transformers.cache_utils", "DynamicCache"): _DynamicCache,
    ("torch", "BFloat16Storage"): _BFloat16Storage,
    ("torch", "FloatStorage"): _FloatStorage,
    ("torch", "HalfStorage"): _HalfStorage,
}


class _PresetUnpickler(pickle.Unpickler):
    """Reads one torch.save archive's data.pkl, once _check_opcodes has passed it. Every global
    goes through find_class (GLOBAL and STACK_GLOBAL; INST, OBJ and the EXT opcodes would too,
    but _check_opcodes refuses them first), every persistent id through persistent_load, so
    nothing outside _ALLOWED can be called."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, label: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix  # "<inner folder>/": torch names it freely (Wayne/ in en-Davis_man)
        self._label = label
        self._storages: dict[str, tuple[type[_StorageKind], _Storage]] = {}
        try:
            order = archive.read(prefix + "byteorder").decode("ascii").strip()
        except KeyError:
            order = "little"  # archives from torch before 1.13 have no byteorder entry
        except (UnicodeDecodeError, zipfile.BadZipFile, OSError) as e:
            raise PresetError(f"{label}: its byteorder entry is unreadable ({e})") from None
        if order not in ("little", "big"):
            raise PresetError(f"{label}: unknown byte order {order!r} in the archive")
        self._order = "<" if order == "little" else ">"

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise PresetError(
                f"{self._label} references {module}.{name}, which is not one of the classes a "
                "voice preset holds; it was refused without running it. A preset may name only "
                "tensors, collections.OrderedDict and transformers' BaseModelOutputWithPast and "
                "DynamicCache (docs/voice-presets.md)."
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        # torch.save writes ("storage", torch.<X>Storage, key, location, numel) for each storage;
        # the bytes are the archive's <prefix>data/<key>. The location ("cuda:0" in the released
        # presets) is where the tensor lived when saved: we read everything to the CPU.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PresetError(f"{self._label}: unexpected persistent id {pid!r:.80}")
        _, tag, key, location, numel = pid
        kind = next((k for k in _STORAGE_KINDS if k is tag), None)
        if kind is None:
            raise PresetError(f"{self._label}: a storage of unknown type {tag!r:.80}")
        if not (isinstance(key, str) and isinstance(location, str)):
            raise PresetError(f"{self._label}: a storage with a malformed key or location")
        if not (type(numel) is int and numel >= 0):
            raise PresetError(f"{self._label}: a storage of {numel!r:.40} elements")
        if key in self._storages:  # two tensors viewing one storage: torch writes it once
            seen_kind, storage = self._storages[key]
            if seen_kind is not kind or storage.data.numel() != numel:
                raise PresetError(f"{self._label}: storage {key} is described two ways")
            return storage
        entry = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(entry)
        except KeyError:
            raise PresetError(
                f"{self._label} is missing {entry}, the data of one of its tensors: the file is "
                "incomplete or damaged; download it again"
            ) from None
        width = np.dtype(kind.numpy_int).itemsize
        if numel * width > _MAX_STORAGE_BYTES:
            raise PresetError(f"{self._label}: {entry} claims {numel} elements, far over a preset")
        if info.file_size != numel * width:
            raise PresetError(
                f"{self._label}: {entry} has {info.file_size} bytes, but the pickle describes "
                f"{numel} elements of {width} bytes: the file is damaged"
            )
        try:
            raw = self._archive.read(entry)
        except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError) as e:
            raise PresetError(
                f"{self._label}: cannot read {entry} ({e}): the file is damaged"
            ) from None
        # Reinterpret the bytes as same-width integers in the file's byte order; astype makes
        # them native (and writable, which torch.from_numpy wants); the view gives the float type.
        ints = np.frombuffer(raw, dtype=np.dtype(self._order + kind.numpy_int))
        flat = torch.from_numpy(ints.astype(np.dtype("=" + kind.numpy_int))).view(kind.dtype)
        storage = _Storage(flat)
        self._storages[key] = (kind, storage)
        return storage


# --- from the unpickled structure to a Preset ---------------------------------------------------


def _describe(obj: Any) -> str:
    names = {
        _TensorRecord: "a tensor",
        _ModelOutput: "a BaseModelOutputWithPast",
        _DynamicCache: "a DynamicCache",
        type(None): "None",
    }
    return names.get(type(obj), f"a {type(obj).__name__}")


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass, and never a size


def _tensor(obj: Any, where: str) -> torch.Tensor:
    """The tensor a _TensorRecord describes, after checking every field of it, on the CPU."""
    if not isinstance(obj, _TensorRecord):
        raise PresetError(f"{where} is {_describe(obj)}, not a tensor")
    storage, offset, size, stride, requires_grad, hooks, metadata = obj.args
    if not isinstance(storage, _Storage):
        raise PresetError(f"{where}: a tensor whose storage is {_describe(storage)}")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise PresetError(f"{where}: a tensor with a malformed size or stride")
    if not all(_is_int(n) and n >= 0 for n in (offset, *size, *stride)):
        raise PresetError(
            f"{where}: a tensor with a negative or non-integer size, stride or offset"
        )
    if not isinstance(requires_grad, bool):
        raise PresetError(f"{where}: a tensor with a malformed requires_grad")
    # torch writes an empty OrderedDict of backward hooks; hooks would be functions, which are
    # not on the allow-list anyway. Tensor metadata (torch's conj/neg bits) never occurs here.
    if not (isinstance(hooks, dict) and not hooks) or metadata not in (None, {}):
        raise PresetError(f"{where}: a tensor with hooks or metadata, which a preset never has")
    available = storage.data.numel()
    if all(size):  # a non-empty tensor: its last element must lie inside the storage
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= available:
            raise PresetError(f"{where}: a tensor reaching past the end of its storage")
    # A view can hold more elements than its storage only by repeating them (stride 0): never
    # in a preset, and a way to make the copy below huge.
    if math.prod(size) > available or offset > available:
        raise PresetError(f"{where}: a tensor of more elements than its storage")
    # as_strided keeps the saved layout (the released K/V caches are transposed views, strides
    # (L*128, 64, 128, 1) for [1, 2, L, 64]); the clone gives each tensor its own dense memory.
    try:
        view = torch.as_strided(storage.data, size, stride, offset)
    except (RuntimeError, OverflowError) as e:  # e.g. a size past int64 beside a 0
        raise PresetError(f"{where}: a tensor torch cannot lay out ({e})") from None
    return view.clone(memory_format=torch.contiguous_format)


def _layers(obj: Any, where: str) -> list[torch.Tensor]:
    if not isinstance(obj, list | tuple) or not obj:
        raise PresetError(f"{where} is {_describe(obj)}, not a list of per-layer tensors")
    out = [_tensor(t, f"{where}[{i}]") for i, t in enumerate(obj)]
    for i, t in enumerate(out):
        if t.ndim != 4 or t.shape[0] != 1:
            raise PresetError(
                f"{where}[{i}] has shape {list(t.shape)}, not [1, kv_heads, positions, head_dim]"
            )
        if t.shape != out[0].shape:
            raise PresetError(
                f"{where}[{i}] has shape {list(t.shape)} but {where}[0] {list(out[0].shape)}"
            )
    return out


def _cache(obj: Any, where: str) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
    """Keys and values per layer, and the cache's own count of positions (or None)."""
    if isinstance(obj, _DynamicCache):
        state = obj.state
        if state is None:
            raise PresetError(f"{where} is an empty DynamicCache (no state was pickled)")
        unknown = sorted(
            str(k) for k in state if k not in ("_seen_tokens", "key_cache", "value_cache")
        )
        if unknown or "key_cache" not in state or "value_cache" not in state:
            raise PresetError(
                f"{where} is a DynamicCache with fields {sorted(map(str, state))}; presets keep "
                "the layout of transformers 4.51 (_seen_tokens, key_cache, value_cache)"
            )
        keys = _layers(state["key_cache"], f"{where}.key_cache")
        values = _layers(state["value_cache"], f"{where}.value_cache")
        seen = state.get("_seen_tokens")
    elif isinstance(obj, list | tuple):
        # The legacy form, DynamicCache.to_legacy_cache(): ((K, V) per layer).
        if not obj or not all(isinstance(p, list | tuple) and len(p) == 2 for p in obj):
            raise PresetError(f"{where} is a {type(obj).__name__} but not one of (K, V) pairs")
        keys = _layers([p[0] for p in obj], f"{where} keys")
        values = _layers([p[1] for p in obj], f"{where} values")
        seen = None
    else:
        raise PresetError(f"{where} is {_describe(obj)}, not a DynamicCache")
    if len(keys) != len(values):
        raise PresetError(f"{where} has keys for {len(keys)} layers but values for {len(values)}")
    return keys, values, seen


def _stream_from_pickle(obj: Any, entry: str, label: str) -> PresetStream:
    where = f"{label}: {entry}"
    if isinstance(obj, _ModelOutput):
        fields = obj.fields
    elif isinstance(obj, dict):
        fields = obj  # the plain form: {"last_hidden_state": ..., "past_key_values": ...}
    else:
        raise PresetError(f"{where} is {_describe(obj)}, not a BaseModelOutputWithPast")
    for name in ("last_hidden_state", "past_key_values"):
        if fields.get(name) is None:
            raise PresetError(f"{where} has no {name}")
    full = _tensor(fields["last_hidden_state"], f"{where}.last_hidden_state")
    if full.ndim != 3 or full.shape[0] != 1:
        raise PresetError(
            f"{where}.last_hidden_state has shape {list(full.shape)}, not [1, positions, hidden]"
        )
    keys, values, seen = _cache(fields["past_key_values"], f"{where}.past_key_values")
    if seen is not None and not (_is_int(seen) and seen == keys[0].shape[2]):
        raise PresetError(
            f"{where}: the cache says it has seen {seen!r:.20} tokens but holds {keys[0].shape[2]}"
        )
    if keys[0].shape != values[0].shape:
        raise PresetError(
            f"{where}: keys of shape {list(keys[0].shape)} but values {list(values[0].shape)}"
        )
    # [1, kv_heads, L, head_dim] per layer -> [layers, kv_heads, L, head_dim]
    hidden = full[0]
    k = torch.cat(keys)
    v = torch.cat(values)
    problem = _stream_problem(hidden, k, v)
    if problem:
        raise PresetError(f"{where}: {problem}")
    return PresetStream(hidden, k, v)


def _finite(preset: Preset, label: str) -> Preset:
    for entry, s in preset.streams().items():
        for part, t in (("hidden state", s.hidden), ("keys", s.k), ("values", s.v)):
            if not bool(torch.isfinite(t).all()):
                raise PresetError(f"{label}: {entry}'s {part} hold NaN or infinite values")
    return preset


def _preset_from_pickle(top: Any, name: str, label: str) -> Preset:
    if not isinstance(top, dict):
        raise PresetError(f"{label} holds {_describe(top)}, not a dict of {', '.join(ENTRIES)}")
    missing = [e for e in ENTRIES if e not in top]
    extra = sorted(str(k) for k in top if k not in ENTRIES)
    if missing or extra:
        raise PresetError(
            f"{label} has entries {sorted(map(str, top))}; a Realtime voice preset has exactly "
            f"{', '.join(ENTRIES)}" + (f" (missing {', '.join(missing)})" if missing else "")
        )
    streams = [_stream_from_pickle(top[e], e, label) for e in ENTRIES]
    return Preset(name, *streams)


_OPS = {op.code: op for op in pickletools.opcodes}


def _check_opcodes(data: bytes, label: str) -> None:
    """Refuses opcodes a preset never uses, and memo indices beyond the pickle's size, before the
    C unpickler sees them: it sizes its memo by the largest index, so one LONG_BINPUT 2**31
    would have it allocate 16 GB. Each opcode is named before its argument is parsed, so only
    the allowed opcodes' argument readers (pickletools', which parse and never run) see the data."""
    stream = io.BytesIO(data)
    while True:
        code = stream.read(1).decode("latin-1")
        op = _OPS.get(code)
        if op is None:
            raise PresetError(f"{label}: its data.pkl is damaged (no pickle opcode {code!r})")
        if op.name not in _OPCODES:
            raise PresetError(
                f"{label}: its data.pkl uses the pickle opcode {op.name}, which torch.save "
                "does not write for a voice preset; it was refused without running it"
            )
        try:
            arg = op.arg.reader(stream) if op.arg is not None else None
        except ValueError as e:
            raise PresetError(f"{label}: its data.pkl is damaged ({e})") from None
        if op.name in _MEMO_OPCODES and not (isinstance(arg, int) and 0 <= arg < len(data)):
            raise PresetError(f"{label}: its data.pkl refers to memo slot {arg}: damaged")
        if op.name == "STOP":
            return


def _load_pt(path: Path) -> Preset:
    label = f"preset {path.name}"
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise PresetError(
            f"{label} is not a torch.save archive (a zip file): it is truncated, damaged or not "
            "a voice preset; download it again"
        ) from None
    with archive:
        found = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(found) != 1:
            raise PresetError(
                f"{label} is a zip file but not a torch.save archive "
                f"({len(found)} <folder>/data.pkl entries, where torch writes one)"
            )
        prefix = found[0][: -len("data.pkl")]
        info = archive.getinfo(found[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise PresetError(f"{label}: its data.pkl is {info.file_size} bytes, far over a preset")
        try:
            data = archive.read(found[0])
        except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError) as e:
            raise PresetError(
                f"{label}: cannot read its data.pkl ({e}): the file is damaged"
            ) from None
        _check_opcodes(data, label)
        unpickler = _PresetUnpickler(data, archive, prefix, label)
        try:
            top = unpickler.load()
        except PresetError as e:
            if str(e).startswith(label):
                raise
            raise PresetError(f"{label}: {e}") from None  # a stand-in's complaint, without a name
        except Exception as e:
            # Only our stand-ins can be called, so what arrives here is the pickle machine
            # (or a stand-in's signature) rejecting malformed input: EOFError, UnpicklingError,
            # TypeError, ... Whatever it is, the file is not a preset we can read.
            raise PresetError(
                f"{label}: its data.pkl is not a readable preset ({type(e).__name__}: {e})"
            ) from None
    return _finite(_preset_from_pickle(top, path.stem, label), label)


# --- our own format -----------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _load_safetensors(path: Path) -> Preset:
    label = f"preset {path.name}"
    expected = [f"{e}.{part}" for e in ENTRIES for part in ("hidden", "k", "v")]
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise PresetError(
                    f"{label} is a safetensors file but not a voice preset (its metadata format "
                    f"is {meta.get('format')!r}, not {FORMAT!r}); make one with "
                    "`vibecast voices convert PRESET.pt`"
                )
            if meta.get("version") != VERSION:
                raise PresetError(
                    f"{label} is a voice preset of version {meta.get('version')!r}; this vibecast "
                    f"reads version {VERSION}"
                )
            keys = set(f.keys())
            missing = [k for k in expected if k not in keys]
            extra = sorted(keys - set(expected))
            if missing or extra:
                raise PresetError(
                    f"{label} lacks {', '.join(missing) or 'nothing'} and has unexpected "
                    f"{', '.join(extra) or 'nothing'}; a preset has exactly {', '.join(expected)}"
                )
            tensors = {k: f.get_tensor(k) for k in expected}
    except SafetensorError as e:
        raise PresetError(
            f"{label} is not a readable safetensors file ({e}); convert it again"
        ) from None
    streams = []
    for entry in ENTRIES:
        hidden, k, v = (tensors[f"{entry}.{part}"] for part in ("hidden", "k", "v"))
        if hidden.dtype not in _FLOATS:
            raise PresetError(f"{label}: {entry}.hidden is {hidden.dtype}, not a float type")
        problem = _stream_problem(hidden, k, v)
        if problem:
            raise PresetError(f"{label}: {entry}: {problem}")
        streams.append(PresetStream(hidden, k, v))
    return _finite(Preset(path.stem, *streams), label)


def load_preset(path: str | Path) -> Preset:
    """A voice preset from a .pt file (torch.save, read by the allow-listed unpickler) or a
    .safetensors file of ours, on the CPU in the dtype it was saved in. PresetError if the file
    is missing, damaged, refers to anything outside the allow-list, or is not a Realtime preset."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            return _load_pt(path)
        if path.suffix == ".safetensors":
            return _load_safetensors(path)
    except OSError as e:
        raise PresetError(f"cannot read preset {path}: {e.strerror or e}") from None
    raise PresetError(f"{path.name} is not a voice preset: expected a .pt or .safetensors file")


def save_preset(preset: Preset, path: str | Path) -> None:
    """Writes `preset` as safetensors (keys lm.hidden, lm.k, lm.v, tts_lm.hidden, ...), in the
    dtype it has. The file appears whole or not at all (written aside, then renamed)."""
    path = Path(path)
    # clone: safetensors wants dense tensors that share no memory with each other.
    tensors = {
        f"{entry}.{part}": t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for entry, s in preset.streams().items()
        for part, t in (("hidden", s.hidden), ("k", s.k), ("v", s.v))
    }
    # A fresh name beside the target (so the rename stays on one file system); save_file creates
    # it with the usual permissions, which tempfile.mkstemp (0600) would not.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": VERSION})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_presets(directory: str | Path) -> dict[str, Preset]:
    """Every preset in a directory, by file stem. Where both en-X.pt and en-X.safetensors exist
    (as `vibecast voices convert` leaves them), the .safetensors one is read: same voice, and
    nothing to unpickle."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PresetError(
            f"{directory} is not a directory; expected a directory of {_EXPECTED_FILES}"
        )
    files: dict[str, Path] = {}
    for p in sorted(directory.iterdir()):
        if p.suffix in SUFFIXES and p.is_file():
            if p.stem not in files or p.suffix == ".safetensors":
                files[p.stem] = p
    if not files:
        raise PresetError(f"no voice presets in {directory}: expected {_EXPECTED_FILES}")
    return {stem: load_preset(p) for stem, p in files.items()}  # a PresetError names the file


def convert(src: str | Path, dst: str | Path | None = None) -> Path:
    """Reads the .pt preset `src` (safely) and writes it as .safetensors: beside it, or at
    `dst` (a file path, or an existing directory to write <stem>.safetensors into). Returns the
    path written. Nothing is written if `src` is refused."""
    src = Path(src)
    if src.suffix != ".pt":
        raise PresetError(f"{src.name}: convert reads .pt presets (torch.save files)")
    preset = load_preset(src)
    if dst is None:
        target = src.with_suffix(".safetensors")
    elif Path(dst).is_dir():
        target = Path(dst) / f"{src.stem}.safetensors"
    else:
        target = Path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_preset(preset, target)
    return target


__all__ = [
    "ENTRIES",
    "Preset",
    "PresetError",
    "PresetStream",
    "convert",
    "load_preset",
    "load_presets",
    "save_preset",
]
