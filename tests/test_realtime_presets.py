"""VibeVoice-Realtime-0.5B voice presets: the two official files load through the allow-list with
the documented shapes; hostile pickles are refused before they run; conversion to safetensors is
bit-exact; damaged files fail with a message that says what is wrong."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import shlex
import struct
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vibecast.engine.vibevoice.presets import (
    ENTRIES,
    Preset,
    PresetError,
    PresetStream,
    convert,
    load_preset,
    load_presets,
    save_preset,
)
from vibecast.voices import main_convert

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT.parent / "shared" / "vibevoice" / "presets"  # CI has ../shared beside the clone
DAVIS = PRESETS / "en-Davis_man.pt"
EMMA = PRESETS / "en-Emma_woman.pt"

# VibeVoice-Realtime-0.5B (reference.md section 8, presets/README.md): hidden 896, 2 KV heads of
# 64, a 4-layer lower LM and a 20-layer TTS LM.
HIDDEN, KV_HEADS, HEAD_DIM, LM_LAYERS, TTS_LAYERS = 896, 2, 64, 4, 20
LAYERS = {"lm": LM_LAYERS, "tts_lm": TTS_LAYERS, "neg_lm": LM_LAYERS, "neg_tts_lm": TTS_LAYERS}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so comparisons are exact (NaN payloads and -0.0 included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def _same_bits(a: Preset, b: Preset) -> None:
    for entry in ENTRIES:
        sa, sb = getattr(a, entry), getattr(b, entry)
        for x, y in ((sa.hidden, sb.hidden), (sa.k, sb.k), (sa.v, sb.v)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(_bits(x), _bits(y)), entry


# --- the official presets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "lm_len", "tts_len"), [(DAVIS, 60, 183), (EMMA, 74, 251)], ids=["davis", "emma"]
)
def test_official_presets_load_with_the_realtime_shapes(
    path: Path, lm_len: int, tts_len: int
) -> None:
    preset = load_preset(path)
    assert preset.name == path.stem
    lengths = {"lm": lm_len, "tts_lm": tts_len, "neg_lm": 1, "neg_tts_lm": 1}
    for entry in ENTRIES:
        s: PresetStream = getattr(preset, entry)
        assert s.length == lengths[entry]
        assert s.hidden.shape == (lengths[entry], HIDDEN)
        assert s.k.shape == (LAYERS[entry], KV_HEADS, lengths[entry], HEAD_DIM)
        assert s.v.shape == s.k.shape
        for t in (s.hidden, s.k, s.v):
            assert t.dtype == torch.bfloat16
            assert t.device.type == "cpu"  # saved tagged cuda:0; read without touching CUDA
            assert bool(torch.isfinite(t).all())
            assert bool(t.abs().sum() > 0)  # real data, not a zero-filled placeholder
    # Each layer holds its own cache: a reader that repeated one layer would pass the shapes.
    assert not torch.equal(preset.tts_lm.k[0], preset.tts_lm.k[1])
    assert not torch.equal(preset.lm.k, preset.lm.v)


def test_official_presets_fit_the_realtime_model_and_not_another() -> None:
    preset = load_preset(DAVIS)
    preset.check(HIDDEN, KV_HEADS, HEAD_DIM, LM_LAYERS, TTS_LAYERS)
    with pytest.raises(PresetError, match=r"tts_lm has 20 layers; this model's TTS LM has 18"):
        preset.check(HIDDEN, KV_HEADS, HEAD_DIM, LM_LAYERS, 18)
    with pytest.raises(PresetError, match=r"\blm has 4 layers; this model's lower LM has 6"):
        preset.check(HIDDEN, KV_HEADS, HEAD_DIM, 6, TTS_LAYERS)
    with pytest.raises(PresetError, match=r"hidden size 896; this model's is 1536"):
        preset.check(1536, KV_HEADS, HEAD_DIM, LM_LAYERS, TTS_LAYERS)
    with pytest.raises(PresetError, match=r"2 KV heads of 64; this model has 4 of 64"):
        preset.check(HIDDEN, 4, HEAD_DIM, LM_LAYERS, TTS_LAYERS)


def test_to_changes_dtype_and_keeps_values() -> None:
    preset = load_preset(EMMA)
    wide = preset.to("cpu", torch.float32)
    assert wide.name == preset.name
    for entry in ENTRIES:
        a, b = getattr(preset, entry), getattr(wide, entry)
        assert b.k.dtype == torch.float32
        assert torch.equal(b.k, a.k.float()) and torch.equal(b.hidden, a.hidden.float())


# --- presets made like the reference makes them, on the CPU -------------------------------------
#
# The reference code saves `{entry: BaseModelOutputWithPast(last_hidden_state, past_key_values=
# DynamicCache)}` with torch.save. transformers is not installed here, so these stand-ins pickle
# the way transformers 4.51 does (ModelOutput.__reduce__ on an OrderedDict dataclass; DynamicCache
# by its instance dict), under the same module names; test_stand_ins_pickle_like_the_official
# checks that the globals they produce are the official files' ones.


class _BaseModelOutputWithPast(OrderedDict):
    __module__ = "transformers.modeling_outputs"  # what pickle writes in the GLOBAL
    __qualname__ = "BaseModelOutputWithPast"

    def __init__(
        self,
        last_hidden_state: Any = None,
        past_key_values: Any = None,
        hidden_states: Any = None,
        attentions: Any = None,
    ) -> None:
        super().__init__()
        self.last_hidden_state = last_hidden_state
        self.past_key_values = past_key_values
        self.hidden_states = hidden_states
        self.attentions = attentions
        for k in ("last_hidden_state", "past_key_values", "hidden_states", "attentions"):
            if getattr(self, k) is not None:
                self[k] = getattr(self, k)

    def __reduce__(self) -> Any:
        # transformers' ModelOutput.__reduce__: OrderedDict's, with the fields as arguments.
        reduced = super().__reduce__()
        assert isinstance(reduced, tuple)
        fn, _args, *rest = reduced
        fields = (self.last_hidden_state, self.past_key_values, self.hidden_states, self.attentions)
        return (fn, fields, *rest)


class _DynamicCache:
    __module__ = "transformers.cache_utils"
    __qualname__ = "DynamicCache"

    def __init__(self, keys: list[Any], values: list[Any], seen: int) -> None:
        self._seen_tokens = seen
        self.key_cache = keys
        self.value_cache = values


@contextmanager
def _transformers_names() -> Iterator[None]:
    """Lets pickle find the stand-ins under transformers' module names while saving."""
    outputs = types.ModuleType("transformers.modeling_outputs")
    outputs.BaseModelOutputWithPast = _BaseModelOutputWithPast  # type: ignore[attr-defined]
    cache = types.ModuleType("transformers.cache_utils")
    cache.DynamicCache = _DynamicCache  # type: ignore[attr-defined]
    modules = {"transformers": types.ModuleType("transformers"), outputs.__name__: outputs}
    modules[cache.__name__] = cache
    with mock.patch.dict(sys.modules, modules):
        yield


def _random_stream(layers: int, length: int, dtype: torch.dtype, gen: torch.Generator) -> Any:
    hidden = torch.randn(1, length, HIDDEN, generator=gen).to(dtype)
    # Like the model's cache: computed [1, L, heads, dim] and transposed, so not contiguous.
    keys = [
        torch.randn(1, length, KV_HEADS, HEAD_DIM, generator=gen).to(dtype).transpose(1, 2)
        for _ in range(layers)
    ]
    values = [
        torch.randn(1, length, KV_HEADS, HEAD_DIM, generator=gen).to(dtype).transpose(1, 2)
        for _ in range(layers)
    ]
    return hidden, keys, values


def _reference_like(dtype: torch.dtype = torch.float32, lm: int = 7, tts: int = 11) -> dict:
    gen = torch.Generator().manual_seed(0)
    lengths = {"lm": lm, "tts_lm": tts, "neg_lm": 1, "neg_tts_lm": 1}
    return {e: _random_stream(LAYERS[e], lengths[e], dtype, gen) for e in ENTRIES}


def _save_reference_like(streams: dict, path: Path, seen: dict[str, int] | None = None) -> None:
    with _transformers_names():
        obj = {
            e: _BaseModelOutputWithPast(
                last_hidden_state=h,
                past_key_values=_DynamicCache(k, v, (seen or {}).get(e, h.shape[1])),
            )
            for e, (h, k, v) in streams.items()
        }
        torch.save(obj, path)


def _globals(pkl: bytes) -> set[str]:
    return {str(arg) for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}


def _building_ops(pkl: bytes) -> set[str]:
    """The opcodes that call or fill objects (memo and literal opcodes vary with sizes)."""
    building = {"REDUCE", "NEWOBJ", "BUILD", "SETITEMS", "APPENDS", "BINPERSID", "GLOBAL"}
    return {op.name for op, _, _ in pickletools.genops(pkl)} & building


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        return z.read(name)


def test_stand_ins_pickle_like_the_official(tmp_path: Path) -> None:
    path = tmp_path / "made.pt"
    _save_reference_like(_reference_like(torch.bfloat16), path)
    made, official = _data_pkl(path), _data_pkl(DAVIS)
    assert _globals(made) == _globals(official)
    assert _building_ops(made) == _building_ops(official)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_preset_saved_by_torch_save_reads_back_exactly(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    streams = _reference_like(dtype)
    path = tmp_path / "tiny.pt"
    _save_reference_like(streams, path)
    preset = load_preset(path)
    for e, (h, keys, values) in streams.items():
        s = getattr(preset, e)
        assert s.hidden.dtype == dtype
        assert torch.equal(_bits(s.hidden), _bits(h[0]))
        assert torch.equal(_bits(s.k), _bits(torch.cat(keys)))
        assert torch.equal(_bits(s.v), _bits(torch.cat(values)))


def test_plain_dict_and_legacy_cache_forms_read_back_exactly(tmp_path: Path) -> None:
    streams = _reference_like()
    path = tmp_path / "plain.pt"
    plain = {
        e: {"last_hidden_state": h, "past_key_values": tuple(zip(k, v, strict=True))}
        for e, (h, k, v) in streams.items()
    }
    torch.save(OrderedDict(plain), path)
    preset = load_preset(path)
    for e, (h, keys, values) in streams.items():
        s = getattr(preset, e)
        assert torch.equal(s.hidden, h[0])
        assert torch.equal(s.k, torch.cat(keys)) and torch.equal(s.v, torch.cat(values))


def test_hidden_and_cache_lengths_must_agree(tmp_path: Path) -> None:
    streams = _reference_like()
    h, k, v = streams["tts_lm"]
    streams["tts_lm"] = (h[:, :-1], k, v)  # one hidden position fewer than the cache holds
    path = tmp_path / "short.pt"
    _save_reference_like(streams, path, seen={"tts_lm": 11})  # the cache is self-consistent
    with pytest.raises(
        PresetError, match=r"tts_lm: its hidden state covers 10 positions but its cache 11"
    ):
        load_preset(path)


def test_layers_must_share_one_shape(tmp_path: Path) -> None:
    streams = _reference_like()
    h, k, v = streams["lm"]
    k = [k[0], k[1][:, :, :-1], k[2], k[3]]
    streams["lm"] = (h, k, v)
    path = tmp_path / "ragged.pt"
    _save_reference_like(streams, path)
    with pytest.raises(
        PresetError, match=r"lm\.past_key_values\.key_cache\[1\] has shape \[1, 2, 6, 64\]"
    ):
        load_preset(path)


def test_cache_token_count_must_match(tmp_path: Path) -> None:
    path = tmp_path / "seen.pt"
    _save_reference_like(_reference_like(), path, seen={"neg_lm": 5})
    with pytest.raises(PresetError, match=r"neg_lm.*has seen 5 tokens but holds 1"):
        load_preset(path)


def test_missing_entry_is_named(tmp_path: Path) -> None:
    streams = _reference_like()
    del streams["neg_tts_lm"]
    path = tmp_path / "three.pt"
    _save_reference_like(streams, path)
    with pytest.raises(PresetError, match=r"three\.pt .*missing neg_tts_lm"):
        load_preset(path)


def test_parameters_are_refused(tmp_path: Path) -> None:
    # torch._utils._rebuild_parameter makes an nn.Parameter: never in a preset, so not allowed.
    streams = _reference_like()
    h, k, v = streams["lm"]
    streams["lm"] = (torch.nn.Parameter(h, requires_grad=False), k, v)
    path = tmp_path / "param.pt"
    _save_reference_like(streams, path)
    with pytest.raises(PresetError, match=r"references torch\._utils\._rebuild_parameter"):
        load_preset(path)


# --- hostile pickles ----------------------------------------------------------------------------


def _unicode(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _call_pickle(module: str, name: str, *args: str) -> bytes:
    """A protocol-2 pickle that calls module.name(*args) when loaded: GLOBAL, MARK, args, TUPLE,
    REDUCE, STOP. This is all it takes; no class needs to exist on the writer's side."""
    return (
        b"\x80\x02c"
        + f"{module}\n{name}\n".encode()
        + b"("
        + b"".join(_unicode(a) for a in args)
        + b"tR."
    )


def _archive(path: Path, pkl: bytes, folder: str = "archive") -> Path:
    """A torch.save-shaped zip around `pkl`."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{folder}/data.pkl", pkl)
        z.writestr(f"{folder}/byteorder", "little")
        z.writestr(f"{folder}/version", "3\n")
    return path


def test_os_system_is_refused_without_running(tmp_path: Path) -> None:
    control, marker = tmp_path / "control", tmp_path / "pwned"
    # The payload works: plain unpickling runs the command.
    assert pickle.loads(_call_pickle("os", "system", f"touch {shlex.quote(str(control))}")) == 0
    assert control.exists()

    path = _archive(
        tmp_path / "en-X.pt", _call_pickle("os", "system", f"touch {shlex.quote(str(marker))}")
    )
    with pytest.raises(PresetError) as e:
        load_preset(path)
    assert "preset en-X.pt references os.system" in str(e.value)
    assert "refused without running it" in str(e.value)
    assert not marker.exists()


def test_builtins_open_is_refused_without_creating_the_file(tmp_path: Path) -> None:
    control, marker = tmp_path / "control", tmp_path / "written"
    opened = pickle.loads(_call_pickle("builtins", "open", str(control), "w"))
    opened.close()
    assert control.exists()

    path = _archive(tmp_path / "voice.pt", _call_pickle("builtins", "open", str(marker), "w"))
    with pytest.raises(PresetError, match=r"references builtins\.open"):
        load_preset(path)
    assert not marker.exists()


class _Call:
    """Pickles as a call of fn(*args), the way an attacker's object would."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> Any:
        return self.fn, self.args


class _Naive(pickle.Unpickler):
    """Unpickling as torch.load(weights_only=False) does it: any global, storages from torch.
    Only for showing that the payload below would run."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("transformers."):
            return {"BaseModelOutputWithPast": _BaseModelOutputWithPast}.get(name, _DynamicCache)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        with warnings.catch_warnings():  # TypedStorage is deprecated, still what torch.save names
            warnings.simplefilter("ignore")
            return pid[1](pid[4])


def _nested_payload(tmp_path: Path, marker: Path) -> Path:
    """A legitimate-looking preset whose third tts_lm key is a command instead of a tensor."""
    streams = _reference_like()
    h, k, v = streams["tts_lm"]
    k = [*k[:2], _Call(os.system, f"touch {shlex.quote(str(marker))}"), *k[3:]]
    streams["tts_lm"] = (h, k, v)
    path = tmp_path / f"nested-{marker.name}.pt"
    _save_reference_like(streams, path)
    return path


def test_payload_nested_in_a_reference_like_preset_is_refused(tmp_path: Path) -> None:
    control, marker = tmp_path / "control", tmp_path / "pwned"
    naive = _Naive(io.BytesIO(_data_pkl(_nested_payload(tmp_path, control)))).load()
    assert control.exists()  # torch.load-style unpickling ran the command...
    assert naive["tts_lm"].past_key_values.key_cache[2] == 0  # ...and kept its exit status

    path = _nested_payload(tmp_path, marker)
    system = f"{os.system.__module__}.{os.system.__name__}"  # posix.system on Linux
    with pytest.raises(PresetError, match=rf"nested-pwned\.pt references {system}, which is not"):
        load_preset(path)
    assert not marker.exists()


def test_a_global_reached_through_an_attribute_path_is_refused(tmp_path: Path) -> None:
    # Plain unpickling (protocol 4) resolves a dotted name attribute by attribute, reaching
    # whatever hangs off an allowed class; the allow-list matches (module, name) pairs exactly.
    pkl = _call_pickle("collections", "OrderedDict.__init__")
    with pytest.raises(PresetError, match=r"references collections\.OrderedDict\.__init__"):
        load_preset(_archive(tmp_path / "dotted.pt", pkl))


def test_protocol_0_call_opcodes_are_refused(tmp_path: Path) -> None:
    # INST names a callable and calls it in one opcode; torch.save never writes it.
    marker = tmp_path / "pwned"
    pkl = b"(" + _unicode(f"touch {shlex.quote(str(marker))}") + b"ios\nsystem\n."
    with pytest.raises(PresetError, match=r"uses the pickle opcode INST"):
        load_preset(_archive(tmp_path / "inst.pt", pkl))
    assert not marker.exists()


def test_huge_memo_index_is_refused(tmp_path: Path) -> None:
    # The C unpickler grows its memo to the largest index it is given (8 bytes a slot).
    pkl = b"\x80\x02Nr" + struct.pack("<I", 1_000_000) + b"."
    with pytest.raises(PresetError, match=r"memo slot 1000000"):
        load_preset(_archive(tmp_path / "memo.pt", pkl))


def test_pickle_cannot_change_our_classes(tmp_path: Path) -> None:
    # GLOBAL _rebuild_tensor_v2 (our _TensorRecord), then BUILD with slot state {"__init__":
    # OrderedDict}: BUILD on a class sets class attributes, so without the seal this would
    # replace the stand-in's constructor for every later load in the process.
    pkl = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
        + b"N}"
        + _unicode("__init__")
        + b"ccollections\nOrderedDict\n"
        + b"s\x86b."
    )
    with pytest.raises(PresetError, match=r"tries to change the class"):
        load_preset(_archive(tmp_path / "poison.pt", pkl))
    load_preset(DAVIS)  # and the loader still works


# --- conversion ---------------------------------------------------------------------------------


def test_convert_round_trip_is_bit_exact(tmp_path: Path) -> None:
    src = tmp_path / DAVIS.name
    src.write_bytes(DAVIS.read_bytes())
    written = convert(src)
    assert written == tmp_path / "en-Davis_man.safetensors"
    converted = load_preset(written)
    assert converted.name == "en-Davis_man"
    _same_bits(load_preset(DAVIS), converted)
    with safe_open(str(written), framework="pt") as f:
        assert f.metadata() == {"format": "vibecast-realtime-preset", "version": "1"}
        assert sorted(f.keys()) == sorted(f"{e}.{p}" for e in ENTRIES for p in ("hidden", "k", "v"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [DAVIS.name, written.name]  # no leftovers


def test_save_preset_keeps_the_dtype(tmp_path: Path) -> None:
    preset = load_preset(EMMA).to("cpu", torch.float16)
    save_preset(preset, tmp_path / "half.safetensors")
    tensors = load_file(tmp_path / "half.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    _same_bits(preset, load_preset(tmp_path / "half.safetensors"))


def test_cli_converts_into_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main_convert([str(DAVIS), str(EMMA)], str(out)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "en-Davis_man.pt" in lines[0] and "lm 60, tts_lm 183, neg_lm 1, neg_tts_lm 1" in lines[0]
    assert "en-Emma_woman.pt" in lines[1] and "lm 74, tts_lm 251" in lines[1]
    for src in (DAVIS, EMMA):
        _same_bits(load_preset(src), load_preset(out / f"{src.stem}.safetensors"))


def test_cli_refuses_a_hostile_file_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    bad = _archive(
        tmp_path / "en-Bad.pt", _call_pickle("os", "system", f"touch {shlex.quote(str(marker))}")
    )
    out = tmp_path / "out"
    assert main_convert([str(bad)], str(out)) == 2
    err = capsys.readouterr().err
    assert "en-Bad.pt references os.system" in err and "refused" in err
    assert not marker.exists()
    assert not out.exists()
    # Beside the source too: nothing but the file itself.
    assert main_convert([str(bad)], None) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["en-Bad.pt"]


def test_cli_converts_the_good_files_and_fails_for_the_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _archive(tmp_path / "bad.pt", _call_pickle("os", "getcwd"))
    assert main_convert([str(bad), str(DAVIS)], str(tmp_path)) == 2
    captured = capsys.readouterr()
    assert "bad.pt references os.getcwd" in captured.err
    assert (tmp_path / "en-Davis_man.safetensors").exists()
    assert not (tmp_path / "bad.safetensors").exists()


# --- damaged and wrong files --------------------------------------------------------------------


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "text.pt"
    path.write_text("hello\n")
    with pytest.raises(
        PresetError, match=r"text\.pt is not a torch\.save archive .*download it again"
    ):
        load_preset(path)


def test_truncated_zip(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    path.write_bytes(DAVIS.read_bytes()[: DAVIS.stat().st_size // 2])
    with pytest.raises(PresetError, match=r"cut\.pt is not a torch\.save archive .*truncated"):
        load_preset(path)


def test_missing_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "holes.pt"
    with zipfile.ZipFile(DAVIS) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename != "Wayne/data/7":
                dst.writestr(info, src.read(info))
    with pytest.raises(PresetError, match=r"holes\.pt is missing Wayne/data/7.*download it again"):
        load_preset(path)


def test_tensor_data_of_the_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(DAVIS) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:-2] if info.filename == "Wayne/data/3" else data)
    with pytest.raises(PresetError, match=r"Wayne/data/3 has 15358 bytes.*damaged"):
        load_preset(path)


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match=r"cannot read preset .*nope\.pt"):
        load_preset(tmp_path / "nope.pt")
    (tmp_path / "voice.wav").write_bytes(b"RIFF")
    with pytest.raises(PresetError, match=r"voice\.wav is not a voice preset"):
        load_preset(tmp_path / "voice.wav")


def _our_tensors(preset: Preset) -> dict[str, torch.Tensor]:
    return {
        f"{e}.{p}": getattr(getattr(preset, e), p).contiguous()
        for e in ENTRIES
        for p in ("hidden", "k", "v")
    }


def test_safetensors_missing_key(tmp_path: Path) -> None:
    tensors = _our_tensors(load_preset(DAVIS))
    del tensors["neg_lm.v"]
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "vibecast-realtime-preset", "version": "1"})
    with pytest.raises(PresetError, match=r"x\.safetensors lacks neg_lm\.v"):
        load_preset(path)


def test_safetensors_of_another_kind(tmp_path: Path) -> None:
    tensors = _our_tensors(load_preset(DAVIS))
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(PresetError, match=r"not a voice preset .*vibecast voices convert"):
        load_preset(path)
    save_file(tensors, path)  # no metadata at all
    with pytest.raises(PresetError, match=r"not a voice preset"):
        load_preset(path)


def test_safetensors_damaged(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_preset(load_preset(DAVIS), good)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(PresetError, match=r"cut\.safetensors is not a readable safetensors file"):
        load_preset(path)


def test_safetensors_with_inconsistent_lengths(tmp_path: Path) -> None:
    tensors = _our_tensors(load_preset(DAVIS))
    tensors["lm.hidden"] = tensors["lm.hidden"][:-1].clone()
    path = tmp_path / "odd.safetensors"
    save_file(tensors, path, metadata={"format": "vibecast-realtime-preset", "version": "1"})
    with pytest.raises(
        PresetError,
        match=r"odd\.safetensors: lm: its hidden state covers 59 positions but its cache 60",
    ):
        load_preset(path)


# --- directories --------------------------------------------------------------------------------


def test_load_presets_by_name(tmp_path: Path) -> None:
    (tmp_path / DAVIS.name).write_bytes(DAVIS.read_bytes())
    convert(EMMA, tmp_path)  # a converted one serves beside an original
    (tmp_path / "notes.txt").write_text("not a preset")
    presets = load_presets(tmp_path)
    assert sorted(presets) == ["en-Davis_man", "en-Emma_woman"]
    _same_bits(presets["en-Emma_woman"], load_preset(EMMA))


def test_load_presets_prefers_the_converted_file(tmp_path: Path) -> None:
    (tmp_path / DAVIS.name).write_bytes(DAVIS.read_bytes())
    convert(tmp_path / DAVIS.name)
    # Were the .pt read, this would fail: the .safetensors beside it is the one served.
    (tmp_path / DAVIS.name).write_text("damaged")
    assert sorted(load_presets(tmp_path)) == ["en-Davis_man"]


def test_load_presets_names_the_bad_file(tmp_path: Path) -> None:
    (tmp_path / DAVIS.name).write_bytes(DAVIS.read_bytes())
    _archive(tmp_path / "en-Evil.pt", _call_pickle("subprocess", "getoutput", "true"))
    with pytest.raises(PresetError, match=r"en-Evil\.pt references subprocess\.getoutput"):
        load_presets(tmp_path)


def test_load_presets_empty_directory_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match=r"no voice presets in .*\*\.pt files .*\*\.safetensors"):
        load_presets(tmp_path)
    with pytest.raises(PresetError, match=r"is not a directory"):
        load_presets(tmp_path / "missing")
