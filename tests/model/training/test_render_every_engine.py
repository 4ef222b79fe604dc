"""Every renderer of the registry on the same pieces: level, length, alignment (also over long
pieces: no drift), pitch, bounded failures, and whether families of sound really differ.

A renderer that is not installed skips, naming the package to install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pretty_midi
import pytest

from model.errors import RenderError
from model.training import render as R
from model.training import render_libs as L

SR = 16_000  # not the model's rate: every engine's rate handling is exercised
FRAME_MS = 1000.0 * R.HOP / R.SAMPLE_RATE  # one CQT hop: the alignment tolerance of test_render
# (program, pitch, time): fast attacks, 1 s apart, drum hits half-way between
PITCHED = [(0, 60, 0.5), (24, 55, 2.5), (33, 40, 4.5), (0, 67, 6.5)]
DRUMS = [(36, 1.5), (38, 3.5), (36, 5.5)]
NEW_ENGINES = ("wildmidi-freepats", "sonivox-eas", "adplay-opl3", "csound-plucked")


def needs(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not R.available(name), reason=f"renderer {name} is not installed "
                              f"({R.install_hint([name]) or 'nothing to install'})")


def each(names) -> list:
    return [pytest.param(n, marks=needs(n), id=n) for n in names]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Decoded .sf3 soundfonts, shared by the tests of this module."""
    return tmp_path_factory.mktemp("sf2")


def mixed_piece() -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI()
    for program in sorted({p for p, _, _ in PITCHED}):
        inst = pretty_midi.Instrument(program)
        inst.notes = [pretty_midi.Note(110, pitch, t, t + 0.25)
                      for p, pitch, t in PITCHED if p == program]
        pm.instruments.append(inst)
    kit = pretty_midi.Instrument(0, is_drum=True)
    kit.notes = [pretty_midi.Note(110, key, t, t + 0.1) for key, t in DRUMS]
    pm.instruments.append(kit)
    return pm


def rms(audio: np.ndarray, t: float, sr: int = SR, width: float = 0.15) -> float:
    return float(np.sqrt(np.mean(audio[int(t * sr): int((t + width) * sr)] ** 2)))


@pytest.mark.parametrize("name", each(R.RENDERERS))
def test_renders_a_mixed_piece_in_time(name: str, cache: Path) -> None:
    pm = mixed_piece()
    audio = R.render(pm, name, sample_rate=SR, tail_s=0.4, cache_dir=cache)
    assert audio.dtype == np.float32 and audio.shape == (int((pm.get_end_time() + 0.4) * SR),)
    assert np.isfinite(audio).all()
    assert np.max(np.abs(audio)) == pytest.approx(R.PEAK, rel=1e-5)
    assert rms(audio, 0.0, width=0.45) < 1e-3  # nothing before the first note
    plays_drums = any(i.is_drum for i in R.renderable_midi(pm, name).instruments)
    times = np.array([t for *_, t in PITCHED] + ([t for _, t in DRUMS] if plays_drums else []))
    assert all(rms(audio, t) > 0.02 for t in times), [round(rms(audio, t), 3) for t in times]
    if not plays_drums:  # left out, not played as pitched notes
        assert all(rms(audio, t) < 0.005 for _, t in DRUMS)
    lag = 1000.0 * (R.onset_times(audio, SR, times) - times)
    assert np.isfinite(lag).all(), lag  # every note heard where it should be
    assert np.abs(lag).max() < FRAME_MS and abs(np.median(lag)) < FRAME_MS / 2, lag


@pytest.mark.parametrize("name", each(NEW_ENGINES))
def test_long_pieces_do_not_drift(name: str) -> None:
    """Measured before the fixes: adplay +1.2 ms per second of music (0.1 s late at 80 s),
    Sonivox -0.08 ms/s. Now below 0.001 ms/s."""
    pm = R.click_track(n_clicks=40, interval_s=2.0)
    audio = R.render(pm, name, sample_rate=R.SAMPLE_RATE)
    times = np.array([n.start for n in pm.instruments[0].notes])
    lag = 1000.0 * (R.onset_times(audio, R.SAMPLE_RATE, times) - times)
    assert np.isfinite(lag).all()
    slope = np.polyfit(times, lag, 1)[0]
    assert abs(slope) < 0.02, f"{name} drifts {slope:.3f} ms per second"
    assert np.abs(lag).max() < 5.0, lag


@pytest.mark.parametrize("name", each(R.RENDERERS))
def test_plays_the_notes_at_their_pitch(name: str, cache: Path) -> None:
    """The lowest strong partial of a piano note is its fundamental, not an octave off (adplay
    was an octave low)."""
    for pitch in (48, 60, 72):
        pm = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(0)
        inst.notes = [pretty_midi.Note(100, pitch, 0.2, 1.2)]
        pm.instruments.append(inst)
        audio = R.render(pm, name, sample_rate=R.SAMPLE_RATE, cache_dir=cache)
        seg = audio[int(0.3 * R.SAMPLE_RATE): int(0.8 * R.SAMPLE_RATE)]
        spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size), 8 * seg.size))
        freq = np.fft.rfftfreq(8 * seg.size, 1 / R.SAMPLE_RATE)
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        amp = {m: spec[(freq > 0.97 * m * f0) & (freq < 1.03 * m * f0)].max()
               for m in (0.25, 0.5, 1.0)}
        assert amp[1.0] > 0.1 * max(amp.values()), (pitch, amp)
        assert amp[0.5] < 0.3 * amp[1.0] and amp[0.25] < 0.3 * amp[1.0], (pitch, amp)


@pytest.mark.parametrize("name", each(n for n, r in R.RENDERERS.items() if r.engine != "sine"))
def test_failures_are_bounded_render_errors(name: str) -> None:
    long_piece = R.click_track(n_clicks=200)
    with pytest.raises(RenderError) as e:
        R.render(long_piece, name, timeout_s=1e-3)
    assert e.value.reason == "timeout"
    bad = R.click_track(n_clicks=2)
    bad.instruments[0].notes[0].pitch = 300  # cannot be written as MIDI
    with pytest.raises(RenderError) as e:
        R.render(bad, name)
    assert e.value.reason == "failed"


@pytest.mark.parametrize("engine, message", [
    pytest.param("wildmidi", "WildMidi_Open", marks=needs("wildmidi-freepats")),
    pytest.param("sonivox", "EAS_OpenFile", marks=needs("sonivox-eas"))])
def test_library_host_says_why_a_file_cannot_be_played(engine: str, message: str,
                                                       tmp_path: Path) -> None:
    (tmp_path / "bad.mid").write_bytes(b"RIFF not a MIDI file at all")
    args = (["wildmidi", str(R.resource("wildmidi-freepats")), "22050"]
            if engine == "wildmidi" else ["sonivox"])
    run = subprocess.run([sys.executable, "-I", str(L.HOST), *args, str(tmp_path / "bad.mid"),
                          str(tmp_path / "out.raw")], capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and message in run.stderr


def timbre(name: str, cache: Path) -> np.ndarray:
    """Of a piano A3 and A4: partials 1..10 (dB under the strongest, floor -60) and the decay
    (dB at 0.35, 0.75, 1.25 s after the onset, weighted 2, floor -40)."""
    sr, out = R.SAMPLE_RATE, []
    for pitch in (57, 69):
        pm = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(0)
        inst.notes = [pretty_midi.Note(100, pitch, 0.2, 1.7)]
        pm.instruments.append(inst)
        audio = R.render(pm, name, cache_dir=cache)
        seg = audio[int(0.3 * sr): int(0.8 * sr)]
        spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size), 8 * seg.size))
        freq = np.fft.rfftfreq(8 * seg.size, 1 / sr)
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        h = np.array([spec[(freq > 0.97 * k * f0) & (freq < 1.03 * k * f0)].max()
                      for k in range(1, 11)])
        out += list(np.maximum(20 * np.log10(h / h.max() + 1e-9), -60))
        env = np.array([rms(audio, t, sr, 0.1) for t in (0.25, 0.6, 1.0, 1.5)])
        out += list(2 * np.maximum(20 * np.log10(env[1:] / env[0] + 1e-9), -40))
    return np.array(out)


@pytest.mark.skipif(not all(R.available(n) for n in R.TRAIN_RENDERERS),
                    reason="the training soundfonts are not all installed "
                    f"({R.install_hint(R.TRAIN_RENDERERS)})")
def test_fm_and_synthesis_sound_unlike_the_training_soundfonts(cache: Path) -> None:
    """Held-out families must be outsiders: every FM and synthesis renderer is farther (mean
    |dB| of the timbre descriptor) from each training soundfont than those are from each other,
    while renderers that share samples sound alike whatever the engine. Measured: training
    spread 7.8; adplay 8.6, Csound 9.9..23; FluidR3Mono-FluidR3 3.1, WildMIDI-TiMidity 1.9."""
    train = {n: timbre(n, cache) for n in R.TRAIN_RENDERERS}

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(np.abs(a - b)))

    spread = max(dist(a, b) for a in train.values() for b in train.values())
    outsiders = [n for n, r in R.RENDERERS.items()
                 if r.family in ("fm", "synthesis") and r.engine != "sine" and R.available(n)]
    if not outsiders:
        pytest.skip(f"no FM or synthesis renderer installed ({R.install_hint(['adplay-opl3'])})")
    for name in outsiders:
        x = timbre(name, cache)
        assert min(dist(x, t) for t in train.values()) > spread, name
    for a, b in (("fluid-fluidr3mono", "fluid-fluidr3"),
                 ("wildmidi-freepats", "timidity-freepats")):
        if R.available(a) and R.available(b):
            assert dist(timbre(a, cache), timbre(b, cache)) < 0.6 * spread, (a, b)
