"""The renderers that do not play samples (adplay's OPL3 FM, Csound synthesis) and the family
split of the registry."""

from __future__ import annotations

import numpy as np
import pretty_midi
import pytest

from model.features import SAMPLE_RATE, audio_to_frames
from model.training import render as R
from model.training import render_engines as E


def piece(n: int, step_s: float = 2.0, program: int = 0, drums: bool = False
          ) -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program)
    inst.notes = [pretty_midi.Note(110, 60 + k % 7, 1.0 + step_s * k, 1.3 + step_s * k)
                  for k in range(n)]
    pm.instruments.append(inst)
    if drums:
        kit = pretty_midi.Instrument(0, is_drum=True)
        kit.notes = [pretty_midi.Note(110, 38, 1.5 + step_s * k, 1.6 + step_s * k)
                     for k in range(n)]
        pm.instruments.append(kit)
    return pm


def test_held_out_families_are_kept_out_of_training():
    fams = {R.RENDERERS[r].family for r in R.HELD_OUT_RENDERERS}
    assert {"fm", "synthesis", "gus"} <= fams  # FM, not sample-based at all, and GUS patches
    assert not set(R.HELD_OUT_RENDERERS) & set(R.TRAIN_RENDERERS)
    assert {R.RENDERERS[r].family for r in R.TRAIN_RENDERERS} == {"sampled-gm"}
    assert all(r.family for r in R.RENDERERS.values())
    assert R.install_hint(["adplay-opl3", "csound-fm"]) == "apt-get install adplay csound"


@pytest.mark.skipif(not R.available("adplay-opl3"), reason="adplay is not installed "
                    "(apt-get install adplay)")
def test_adplay_plays_a_long_piece_to_its_last_note():
    # libadplug's MIDI player stopped ~4 s early: the last notes of every piece were missing
    pm = piece(30)  # one note every 2 s, the last at 59 s
    audio = R.render(pm, "adplay-opl3", tail_s=0.5)
    late = audio[int(58.5 * SAMPLE_RATE):int(59.6 * SAMPLE_RATE)]
    quiet = audio[int(57.8 * SAMPLE_RATE):int(58.5 * SAMPLE_RATE)]
    assert np.sqrt(np.mean(late ** 2)) > 10 * np.sqrt(np.mean(quiet ** 2))
    assert len(E.adplay_midi(pm).instruments) == 2 and len(pm.instruments) == 1


@pytest.mark.skipif(not R.available("csound-fm"), reason="csound is not installed "
                    "(apt-get install csound)")
def test_csound_instruments_differ_and_leave_drums_out():
    pm = piece(4, program=40, drums=True)
    assert [i.is_drum for i in R.renderable_midi(pm, "csound-fm").instruments] == [False]
    spectra = {}
    for name in ("csound-fm", "csound-plucked", "csound-subtractive", "csound-additive"):
        frames = audio_to_frames(R.render(pm, name), SAMPLE_RATE)
        spectra[name] = frames[frames.any(axis=1)].mean(axis=0)
    names = list(spectra)
    for i, a in enumerate(names):  # four different sounds of the same notes: the bins of the
        for b in names[i + 1:]:  # harmonics differ (the shared pitches dominate a cosine)
            assert np.abs(spectra[a] - spectra[b]).max() > 0.015, (a, b)  # measured ≥ 0.024


@pytest.mark.skipif(not (R.available("adplay-opl3") and R.available("fluid-fluidr3")),
                    reason="adplay or fluidsynth + FluidR3 is not installed")
def test_fm_sounds_unlike_the_sampled_piano_of_the_same_notes():
    pm = piece(6, program=0)

    def spectrum(name: str) -> np.ndarray:
        frames = audio_to_frames(R.render(pm, name), SAMPLE_RATE)
        return frames[frames.any(axis=1)].mean(axis=0)

    fm, sampled, again = spectrum("adplay-opl3"), spectrum("fluid-fluidr3"), \
        spectrum("fluid-fluidr3")
    np.testing.assert_allclose(sampled, again, atol=1e-6)  # a render is deterministic
    assert np.abs(fm - sampled).max() > 0.04  # measured 0.059 (TiMidity vs FluidR3: 0.023)
