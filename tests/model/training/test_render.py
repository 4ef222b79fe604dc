"""Tests of model.training.render: the registry, each renderer's output and alignment, sf3
decoding."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import soundfile as sf

from model.errors import RenderError
from model.synth import midi_to_audio
from model.training import render as R

NEEDS = {name: pytest.mark.skipif(not R.available(name), reason=f"{name} is not installed")
         for name in R.RENDERERS}


def _notes(program: int = 0, pitch: int = 60, n: int = 4, is_drum: bool = False
           ) -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program, is_drum=is_drum)
    inst.notes = [pretty_midi.Note(100, pitch, 0.5 * k, 0.5 * k + 0.3) for k in range(n)]
    pm.instruments.append(inst)
    return pm


def test_registry_keeps_the_held_out_renderer_out_of_training() -> None:
    assert R.HELD_OUT in R.RENDERERS and R.HELD_OUT not in R.TRAIN_RENDERERS
    assert {R.RENDERERS[r].engine for r in R.TRAIN_RENDERERS} == {"fluidsynth"}
    assert R.RENDERERS[R.HELD_OUT].engine != "fluidsynth"  # another engine, not only samples
    assert R.available("sine") and "sine" in R.available_renderers()
    assert set(R.available_renderers()) <= set(R.RENDERERS)
    with pytest.raises(RenderError) as e:
        R.render(_notes(), "no-such-renderer")
    assert e.value.reason == "unknown_renderer"


@pytest.mark.parametrize("name", list(R.RENDERERS))
def test_render_length_level_and_alignment(name: str) -> None:
    if not R.available(name):
        pytest.skip(f"{name} is not installed")
    pm = _notes(n=3)
    audio = R.render(pm, name, tail_s=0.25)
    assert audio.dtype == np.float32
    assert audio.shape == (int((pm.get_end_time() + 0.25) * R.SAMPLE_RATE),)
    assert np.max(np.abs(audio)) == pytest.approx(R.PEAK, rel=1e-5)
    # Onsets of a click track within a CQT frame of the note times (measured: fluidsynth
    # +6..11 ms, timidity +1.3 ms with --preserve-silence, sine +0.1 ms).
    lag = R.measure_alignment(name, n_clicks=8)
    assert lag["missed"] == 0
    assert abs(lag["lag_ms_min"]) < lag["frame_ms"] and abs(lag["lag_ms_max"]) < lag["frame_ms"]
    assert abs(lag["lag_ms_median"]) < lag["frame_ms"] / 2


def test_onset_detector_sees_a_late_click() -> None:
    """measure_alignment would miss a delay if onset_times did: shift a click by 100 ms."""
    sr = 22050
    audio = np.zeros(sr * 2, np.float32)
    audio[int(1.1 * sr): int(1.15 * sr)] = np.sin(np.arange(int(0.05 * sr)) * 0.3)
    found = R.onset_times(audio, sr, np.array([1.0, 0.4]))
    assert found[0] == pytest.approx(1.1, abs=0.002)
    assert np.isnan(found[1])


def test_sine_renders_only_pitched_notes_and_refuses_silence() -> None:
    pm = _notes()
    pm.instruments.append(_notes(pitch=36, is_drum=True).instruments[0])
    assert [i.is_drum for i in R.renderable_midi(pm, "sine").instruments] == [False]
    assert len(pm.instruments) == 2  # not modified
    with pytest.raises(RenderError) as e:
        R.render(_notes(pitch=36, is_drum=True), "sine")
    assert e.value.reason == "silent"
    with pytest.raises(RenderError) as e:
        R.render(_notes(n=40), "sine", max_duration_s=5.0)
    assert e.value.reason == "too_long"


@NEEDS[R.HELD_OUT]
def test_timidity_never_falls_back_to_another_sample_set(tmp_path: Path) -> None:
    """Debian's timidity.cfg (read before -c) may source a training soundfont: a program or a
    drum key freepats lacks would sound with it. renderable_midi must leave none."""
    pm = pretty_midi.PrettyMIDI()
    for program in range(128):
        inst = pretty_midi.Instrument(program)
        inst.notes.append(pretty_midi.Note(90, 60, 0.01 * program, 0.01 * program + 0.2))
        inst.control_changes.append(pretty_midi.ControlChange(0, 8, 0.0))  # bank select
        pm.instruments.append(inst)
    kit = pretty_midi.Instrument(25, is_drum=True)  # a kit freepats does not have
    kit.notes = [pretty_midi.Note(90, key, 0.1, 0.2) for key in range(27, 88)]
    pm.instruments.append(kit)
    safe = R.renderable_midi(pm, R.HELD_OUT)
    programs, keys = R._freepats_map(R.resource(R.HELD_OUT))
    assert {i.program for i in safe.instruments if not i.is_drum} <= programs
    kit = safe.instruments[-1]
    assert {n.pitch for n in kit.notes} <= keys and kit.program == 0
    assert safe.instruments[3].program == 2  # 3 honky-tonk → 2, the nearest piano freepats has
    safe.write(str(tmp_path / "safe.mid"))
    log = subprocess.run([shutil.which("timidity"), "-idvv", "-OrM1sl", "-o", str(tmp_path / "o"),
                          "-c", str(R.resource(R.HELD_OUT)), str(tmp_path / "safe.mid")],
                         capture_output=True, text=True, timeout=60)
    assert log.returncode == 0
    assert "Loading SF" not in log.stdout + log.stderr


@NEEDS[R.HELD_OUT]
def test_timidity_timeout_is_a_render_error() -> None:
    with pytest.raises(RenderError) as e:
        R.render(_notes(n=200), R.HELD_OUT, timeout_s=1e-3)
    assert e.value.reason == "timeout"


# --- sf3 → sf2 on a soundfont built in code -------------------------------------------------------

def _tiny_sf3(path: Path, tone: np.ndarray, loop: tuple[int, int]) -> None:
    """One preset → one instrument → one looped Ogg Vorbis sample (the sftools layout)."""
    ogg = io.BytesIO()
    sf.write(ogg, tone, 44100, format="OGG", subtype="VORBIS")
    blob = ogg.getvalue()

    def ck(cid: bytes, payload: bytes) -> bytes:
        return cid + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)

    def lst(kind: bytes, *chunks: bytes) -> bytes:
        return ck(b"LIST", kind + b"".join(chunks))

    phdr = (struct.pack("<20sHHHIII", b"Tone", 0, 0, 0, 0, 0, 0)
            + struct.pack("<20sHHHIII", b"EOP", 0, 0, 1, 0, 0, 0))
    bag2 = struct.pack("<HHHH", 0, 0, 1, 0)
    mod0 = bytes(10)
    pgen = struct.pack("<HH", 41, 0) + bytes(4)  # instrument 0
    inst = struct.pack("<20sH", b"ToneI", 0) + struct.pack("<20sH", b"EOI", 1)
    igen = struct.pack("<HH", 54, 1) + struct.pack("<HH", 53, 0) + bytes(4)  # loop, sample 0
    bag3 = struct.pack("<HHHH", 0, 0, 2, 0)
    shdr = (struct.pack("<20sIIIIIBbHH", b"tone", 0, len(blob), loop[0], loop[1], 44100, 69, 0,
                        0, 0x11)
            + struct.pack("<20sIIIIIBbHH", b"EOS", 0, 0, 0, 0, 0, 0, 0, 0, 0))
    body = (b"sfbk" + lst(b"INFO", ck(b"ifil", struct.pack("<HH", 3, 1)), ck(b"INAM", b"t\0"))
            + lst(b"sdta", ck(b"smpl", blob))
            + lst(b"pdta", ck(b"phdr", phdr), ck(b"pbag", bag2), ck(b"pmod", mod0),
                  ck(b"pgen", pgen), ck(b"inst", inst), ck(b"ibag", bag3), ck(b"imod", mod0),
                  ck(b"igen", igen), ck(b"shdr", shdr)))
    path.write_bytes(ck(b"RIFF", body))


def test_sf3_to_sf2_decodes_samples_and_makes_loops_absolute(tmp_path: Path) -> None:
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    _tiny_sf3(tmp_path / "t.sf3", tone, (1000, 40000))
    out = R.sf3_to_sf2(tmp_path / "t.sf3", tmp_path / "cache" / "t.sf2")
    data = out.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"sfbk"
    lists = {data[p:p + 4]: (p + 4, p + s) for c, p, s in R._chunks(data, 12, len(data))
             if c == b"LIST"}
    sub = {k: {c: (p, s) for c, p, s in R._chunks(data, *lists[k])} for k in lists}
    p, _ = sub[b"INFO"][b"ifil"]
    assert struct.unpack("<HH", data[p:p + 4]) == (2, 1)
    p, _ = sub[b"pdta"][b"shdr"]
    _, start, end, a, b, rate, _, _, _, kind = struct.unpack("<20sIIIIIBbHH", data[p:p + 46])
    assert (start, a, b, rate, kind) == (0, 1000, 40000, 44100, 0x1)  # flag 0x10 cleared
    p, size = sub[b"sdta"][b"smpl"]
    pcm = np.frombuffer(data[p:p + size], "<i2")
    assert size == 2 * (end + 46) and not pcm[end:].any()  # the 46 zero frames of the spec
    ref, _ = sf.read(io.BytesIO(_ogg_of(tmp_path / "t.sf3")), dtype="int16")
    assert np.array_equal(pcm[:end], ref)
    assert R.sf3_to_sf2(tmp_path / "t.sf3", out) == out  # cached: not rewritten
    if shutil.which("fluidsynth"):  # the decoded font sounds exactly like the compressed one
        pm = _notes(n=2)
        x = midi_to_audio(pm, renderer="fluidsynth", soundfont=tmp_path / "t.sf3")
        y = midi_to_audio(pm, renderer="fluidsynth", soundfont=out)
        assert np.abs(x).max() > 0.01 and np.allclose(x, y, atol=1e-4)


def _ogg_of(path: Path) -> bytes:
    data = path.read_bytes()
    i = data.index(b"smpl")
    size = struct.unpack("<I", data[i + 4:i + 8])[0]
    return data[i + 8:i + 8 + size]
