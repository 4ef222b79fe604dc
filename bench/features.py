"""Benchmark: MIDI → frames (synth vs fast) and audio → CQT frames, on this machine.

Prints one table: seconds of compute per minute of music (lower is better), times real time,
and the ratio to the FluidSynth synth path measured in the same run. Pieces: procedural
multi-instrument pieces built in code, plus music21 corpus works when music21 is installed.

    .venv/bin/python bench/features.py [--repeat 3] [--corpus bach/bwv66.6 ...] [--no-corpus]
                                       [--threads N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pretty_midi
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import best_time  # noqa: E402
from model import fastrender as R  # noqa: E402
from model import features as F  # noqa: E402
from model import midi as M  # noqa: E402
from model import synth as S  # noqa: E402

DEFAULT_CORPUS = ("bach/bwv66.6", "mozart/k80/movement1")


def _pieces(corpus: list[str]) -> list[tuple[str, pretty_midi.PrettyMIDI]]:
    out = [("demo seed 0 (piano/bass/strings/flute/drums)", R.demo_piece(60.0, seed=0)),
           ("demo seed 1 (e-piano/bass/choir/sax/drums)",
            R.demo_piece(60.0, seed=1, programs=(4, 32, 52, 65)))]
    if not corpus:
        return out
    try:
        import music21
    except ImportError:
        print("(music21 not installed: corpus pieces skipped)")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        for name in corpus:
            path = Path(tmp) / "piece.mid"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    music21.corpus.parse(name).write("midi", fp=str(path))
                out.append((f"music21 {name}", M.load_midi(path)))
            except Exception as e:  # a corpus work that does not convert is skipped, as in data
                print(f"(corpus {name} skipped: {e})")
    return out


def _fluidsynth_version() -> str:
    exe = shutil.which("fluidsynth")
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0] if out else "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    ap.add_argument("--corpus", nargs="*", default=list(DEFAULT_CORPUS))
    ap.add_argument("--no-corpus", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default). Small streaming pushes "
                    "run faster on 1 thread when the cores are shared")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"midimatch bench/features.py  {dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads, device CPU; {_fluidsynth_version()}; load avg {os.getloadavg()[0]:.1f}")

    pieces = _pieces([] if args.no_corpus else args.corpus)
    minutes = sum(pm.get_end_time() for _, pm in pieces) / 60.0
    print(f"pieces ({minutes:.1f} min of music):")
    for name, pm in pieces:
        notes = sum(len(i.notes) for i in pm.instruments)
        print(f"  {name}: {pm.get_end_time():.1f} s, {len(pm.instruments)} instruments, "
              f"{notes} notes")

    R.midi_to_frames_fast(pieces[0][1])  # numba compile / cache load outside the timings
    renderers = S.available_renderers()
    rows: dict[str, float] = {}  # label -> seconds per minute of music

    def per_minute(label: str, fn: Callable[[pretty_midi.PrettyMIDI], object]) -> None:
        total = sum(best_time(lambda pm=pm: fn(pm), args.repeat, warmup=False) for _, pm in pieces)
        rows[label] = total / minutes

    audio: dict[str, list[np.ndarray]] = {}
    for r in renderers:
        audio[r] = [S.midi_to_audio(pm, renderer=r) for _, pm in pieces]
        per_minute(f"synth path, {r}: render + CQT",
                   lambda pm, r=r: S.midi_to_frames_synth(pm, renderer=r))
        per_minute(f"  of which {r} render", lambda pm, r=r: S.midi_to_audio(pm, renderer=r))
    per_minute("fast note render (numba)", R.midi_to_frames_fast)

    # CQT alone, on the two procedural pieces' renders (2 min is plenty for a rate); other
    # input rates include the streaming resampler.
    music = audio[renderers[0]][:2]
    music_min = sum(a.size for a in music) / F.SAMPLE_RATE / 60.0
    for rate in (22050, 44100, 48000):
        clips = [a if rate == F.SAMPLE_RATE else
                 np.interp(np.arange(int(a.size * rate / F.SAMPLE_RATE)) * F.SAMPLE_RATE / rate,
                           np.arange(a.size), a).astype(np.float32) for a in music]
        t = sum(best_time(lambda c=c, r=rate: F.audio_to_frames(c, r), args.repeat, warmup=False)
                for c in clips)
        rows[f"CQT {rate / 1000:g} kHz, whole signal"] = t / music_min

        def stream(c: np.ndarray, rate: int = rate) -> None:
            s, step = F.StreamingCQT(rate), rate // 10
            for i in range(0, c.size, step):
                s.push(c[i:i + step])
            s.finish()
        t = sum(best_time(lambda c=c: stream(c), args.repeat, warmup=False) for c in clips)
        rows[f"CQT {rate / 1000:g} kHz, streaming 100 ms pushes"] = t / music_min

    base_label = f"synth path, {renderers[0]}: render + CQT"
    base = rows[base_label]
    print()
    print(f"{'step':<44}{'s / min of music':>17}{'x real time':>13}{'vs ' + renderers[0]:>17}")
    print("-" * 91)
    for label, s in rows.items():
        ratio = "1 (baseline)" if label == base_label else f"{base / s:.3g}x faster"
        print(f"{label:<44}{s:>17.4f}{60.0 / s:>13.0f}{ratio:>17}")


if __name__ == "__main__":
    main()
