"""SoundBlocks: the music's start and sustained sound per period, in stream-aligned 10 ms
blocks, the same for any chunking, a click not taken for music (as model.features.music_span)."""

from __future__ import annotations

import numpy as np

from model.features import music_span
from worker.onset import MIN_LOUD, SUSTAIN_BLOCKS, SoundBlocks

SR = 22050
BLOCK = int(round(0.01 * SR))


def signal(*parts: tuple[str, float]) -> np.ndarray:
    """Mono audio from (kind, seconds) parts: 'quiet', 'tone' (a 440 Hz sine at -10 dBFS),
    'click' (one full-scale 5 ms burst, then quiet for the rest)."""
    out = []
    for kind, seconds in parts:
        n = int(round(seconds * SR))
        x = np.zeros(n, np.float32)
        if kind == "tone":
            x[:] = 0.3 * np.sin(2 * np.pi * 440.0 * np.arange(n) / SR)
        elif kind == "click":
            x[:int(0.005 * SR)] = 1.0
        out.append(x)
    return np.concatenate(out)


def run(x: np.ndarray, chunks: list[int] | None = None, period: int = SR) -> tuple:
    """Feed ``x`` in ``chunks`` (sizes, cycled; default one piece); (onset sample, per period
    whether it held sustained sound)."""
    b = SoundBlocks(SR)
    b.look()
    sustained, i, k, fed = [], 0, 0, 0
    sizes = chunks or [x.shape[0]]
    while i < x.shape[0]:
        n = min(sizes[k % len(sizes)], x.shape[0] - i, period - fed % period)
        b.push(np.square(x[i:i + n].astype(np.float64)))
        i, fed, k = i + n, fed + n, k + 1
        if fed % period == 0:
            sustained.append(b.period_sustained)
            b.take_period()
    return b.onset_sample, sustained


def test_the_onset_is_the_music_start_for_any_chunking():
    x = signal(("quiet", 2.337), ("tone", 2.0))
    start = run(x)[0]
    # the block that holds the first sample of music (2.337 s = sample 51,531, block 234)
    assert start == (int(round(2.337 * SR)) // BLOCK) * BLOCK == 51_480
    for chunks in ([SR // 10], [1000], [7, 4096, 333], [SR]):
        assert run(x, chunks)[0] == start
    # what the offline search takes for the music's start, to the sample
    assert music_span(x[:, None], SR)[0] == start


def test_a_click_in_the_quiet_is_neither_the_onset_nor_music():
    x = signal(("quiet", 1.0), ("click", 2.0), ("quiet", 1.0), ("tone", 2.0))
    onset, sustained = run(x, [SR // 10])
    assert onset == music_span(x[:, None], SR)[0] == 88_000  # the music at 4 s (block 400),
    # not the click at 1 s
    # periods: quiet, click (loud RMS, but no sustained sound), quiet, quiet, tone, tone
    assert sustained == [False, False, False, False, True, True]
    # a short note counts: MIN_LOUD blocks of sound (one touching fewer blocks does not; a
    # sound partly in a block makes it loud)
    assert run(signal(("quiet", 0.5), ("tone", MIN_LOUD * 0.01 + 0.002), ("quiet", 0.5)))[1] \
        == [True]
    assert run(signal(("quiet", 0.5), ("tone", (MIN_LOUD - 2) * 0.01), ("quiet", 0.5)))[1] \
        == [False]
    assert SUSTAIN_BLOCKS == 10 and MIN_LOUD == 5


def test_look_starts_a_new_search_and_silence_has_no_onset():
    b = SoundBlocks(SR)
    b.push(np.square(signal(("tone", 1.0), ("quiet", 2.0))).astype(np.float64))
    assert b.onset_sample is None and b.period_sustained  # not looking: no onset, but sound
    b.take_period()
    b.look()
    b.push(np.square(signal(("quiet", 1.0))).astype(np.float64))
    assert b.onset_sample is None and not b.period_sustained
    b.push(np.square(signal(("tone", 0.5))).astype(np.float64))
    assert b.onset_sample == (4 * SR // BLOCK) * BLOCK
    b.push(np.square(signal(("quiet", 0.5))).astype(np.float64))
    b.look()  # a query cleared in the quiet: the next music's start
    b.push(np.square(signal(("quiet", 0.5), ("tone", 0.5))).astype(np.float64))
    assert b.onset_sample == (int(5.5 * SR) // BLOCK) * BLOCK


def test_music_that_starts_just_before_a_look_keeps_its_start():
    # music in the last 40 ms of a period is not sustained there (the period is quiet and the
    # session clears its query, calling look()); the onset is still its first block, not the
    # first block after the look
    b = SoundBlocks(SR)
    b.look()
    b.push(np.square(signal(("quiet", 0.96), ("tone", 0.04))).astype(np.float64))
    assert not b.period_sustained and b.onset_sample is None
    b.take_period()
    b.look()
    b.push(np.square(signal(("tone", 1.0))).astype(np.float64))
    assert b.onset_sample == (int(round(0.96 * SR)) // BLOCK) * BLOCK
