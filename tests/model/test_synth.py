"""Tests of model.synth: renderers, the bounded FluidSynth process, the two MIDI → frames paths."""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np
import pretty_midi
import pytest

from model import features as F
from model import synth as S
from model.errors import RenderError
from model.fastrender import demo_piece, n_frames
from model.midi import load_notes
from tests.conftest import one_note

HAS_FLUIDSYNTH = "fluidsynth" in S.available_renderers()


def _pm_bytes(pm: pretty_midi.PrettyMIDI) -> bytes:
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


# --- rendering ---------------------------------------------------------------------------------

def test_available_renderers_and_soundfont() -> None:
    assert S.available_renderers()[-1] == "pretty_midi"
    sf2 = S.default_soundfont()
    assert sf2 is None or sf2.is_file()


@pytest.mark.parametrize("renderer", ["pretty_midi", "fluidsynth"])
def test_render_length_and_sound(renderer: str) -> None:
    if renderer == "fluidsynth" and not HAS_FLUIDSYNTH:
        pytest.skip("fluidsynth or a soundfont is not installed")
    pm = demo_piece(3.0)
    audio = S.midi_to_audio(pm, sample_rate=22050, renderer=renderer, tail_s=0.25)
    assert audio.dtype == np.float32
    assert audio.shape == (int((pm.get_end_time() + 0.25) * 22050),)
    assert not F.is_silent(audio[:22050], threshold_db=-40)
    assert np.isfinite(audio).all()


def test_pretty_midi_render_of_drums_only_is_silence_not_nan() -> None:
    audio = S.midi_to_audio(one_note(38, 0.0, 0.5, drum=True), renderer="pretty_midi")
    assert np.isfinite(audio).all() and not audio.any()


def test_render_failures_are_typed(tmp_path) -> None:
    pm = demo_piece(2.0)
    long = one_note(60, 0.0, 4000.0)
    cases: list[tuple[dict, str, pretty_midi.PrettyMIDI]] = [
        ({"renderer": "timidity"}, "unavailable", pm),
        ({"renderer": "pretty_midi"}, "too_long", long),
    ]
    if HAS_FLUIDSYNTH:
        junk = tmp_path / "junk.sf2"
        junk.write_bytes(b"not a soundfont")
        cases += [({"renderer": "fluidsynth", "soundfont": junk}, "unavailable", pm),
                  ({"renderer": "fluidsynth", "timeout_s": 1e-3}, "timeout", pm)]
    for kwargs, reason, piece in cases:
        with pytest.raises(RenderError) as e:
            S.midi_to_audio(piece, **kwargs)
        assert e.value.reason == reason, kwargs


FAKE_FLUIDSYNTH = """#!{python}
import struct, sys, time
out = sys.argv[sys.argv.index("-F") + 1]
if "{mode}" == "endless":  # the corpus file that rendered gigabytes
    chunk = struct.pack("<f", 0.25) * 8192
    with open(out, "wb") as f:
        while True:
            f.write(chunk)
            f.flush()
elif "{mode}" == "hang":
    time.sleep(60)
else:
    sys.stderr.write("boom\\n")
    sys.exit(3)
"""


@pytest.mark.parametrize("mode,reason", [("endless", None), ("hang", "timeout"),
                                         ("crash", "failed")])
def test_fluidsynth_process_is_bounded(tmp_path, monkeypatch, mode: str,
                                       reason: str | None) -> None:
    fake = tmp_path / "fluidsynth"
    fake.write_text(FAKE_FLUIDSYNTH.format(python=sys.executable, mode=mode))
    fake.chmod(0o755)
    sf2 = tmp_path / "fake.sf2"
    sf2.write_bytes(b"RIFF\x04\x00\x00\x00sfbk")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    pm = one_note(60, 0.0, 2.0)
    t0 = time.perf_counter()
    if reason is None:  # cut at the piece's length plus tail, not left to run
        audio = S.midi_to_audio(pm, renderer="fluidsynth", soundfont=sf2, tail_s=0.5,
                                timeout_s=20)
        assert audio.shape == (int(2.5 * 22050),) and np.allclose(audio, 0.25)
    else:
        with pytest.raises(RenderError) as e:
            S.midi_to_audio(pm, renderer="fluidsynth", soundfont=sf2, timeout_s=1.0)
        assert e.value.reason == reason
        assert reason != "failed" or "boom" in str(e.value)
    assert time.perf_counter() - t0 < 10.0


# --- the two paths together --------------------------------------------------------------------

def _mean_frame_corr(a: np.ndarray, b: np.ndarray) -> float:
    live = (np.abs(a).sum(1) > 0) & (np.abs(b).sum(1) > 0)
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a[live], b[live],
                                                                  strict=True)]))


def test_fast_and_synth_frames_agree(capsys: pytest.CaptureFixture[str]) -> None:
    pm = demo_piece(20.0, seed=5)
    synth = S.midi_to_frames(pm, method="synth")
    fast = S.midi_to_frames(pm, method="fast")
    assert synth.shape == fast.shape == (n_frames(pm), 48)
    matched = _mean_frame_corr(synth, fast)
    bar = int(round(2.0 * F.FRAME_RATE))  # one bar later: another chord
    shifted = _mean_frame_corr(synth[bar:], fast[:-bar])
    with capsys.disabled():
        print(f"\n[fast vs synth ({S.available_renderers()[0]})] mean per-frame correlation "
              f"{matched:.3f}; one bar off {shifted:.3f}")
    # Measured 0.587 (fluidsynth) and 0.451 (pretty_midi's sines); one bar off -0.21 / 0.12.
    assert matched >= (0.45 if HAS_FLUIDSYNTH else 0.3)
    assert matched >= shifted + 0.25


def test_midi_to_frames_dispatch() -> None:
    pm = one_note(60, 0.0, 1.0)
    with pytest.raises(ValueError):
        S.midi_to_frames(pm, method="piano_roll")
    with pytest.raises(TypeError):
        S.midi_to_frames(pm, method="fast", renderer="fluidsynth")
    frames = S.midi_to_frames(pm, method="synth", renderer="pretty_midi")
    assert frames.shape == (n_frames(pm), 48) and frames.dtype == np.float32
    assert frames[5].argmax() == 60 - F.MIDI_LO
    table = load_notes(_pm_bytes(pm))
    np.testing.assert_array_equal(S.midi_to_frames(table, method="fast"),
                                  S.midi_to_frames(pm, method="fast"))
    with pytest.raises(TypeError):
        S.midi_to_frames(table, method="synth")


FLICKERING_RENDERER = """#!{python}
import os, struct, sys, time
out = sys.argv[1]
t0 = time.monotonic()
while time.monotonic() - t0 < 0.4:  # the output file comes and goes while it runs
    open(out, "wb").close()
    os.remove(out)
with open(out, "wb") as f:
    f.write(struct.pack("<f", 0.5) * 100)
"""


def test_a_renderer_that_removes_its_output_while_running_is_not_a_crash(tmp_path,
                                                                         monkeypatch) -> None:
    """Found by `eval prepare --renderers csound-fm`: Csound's output file vanished between the
    watch loop's exists() and stat(), and the FileNotFoundError ended a 20-minute run."""
    fake = tmp_path / "flicker"
    fake.write_text(FLICKERING_RENDERER.format(python=sys.executable))
    fake.chmod(0o755)
    pm = one_note(60, 0.0, 1.0)
    # the race, made certain: exists() says yes whatever the file system says
    monkeypatch.setattr(S.Path, "exists", lambda self: True)
    samples, _ = S.run_bounded_render("flicker", pm, lambda mid, raw: [str(fake), str(raw)],
                                      cap_bytes=1 << 20, timeout_s=20, dtype="<f4")
    assert samples.shape == (100,) and np.all(samples == 0.5)
    # a renderer that exits 0 without writing anything is a typed failure, not a crash
    with pytest.raises(RenderError) as e:
        S.run_bounded_render("nothing", pm, lambda mid, raw: ["true"], cap_bytes=1 << 20,
                             timeout_s=20, dtype="<f4")
    assert e.value.reason == "failed"
