"""Where a live stream's music starts, and whether a result period holds music, in fine blocks.

The offline search leaves the quiet at a query's edges out (:func:`model.features.music_span`:
``EDGE_BLOCK_S`` blocks, the music starting at a loud block followed by ``EDGE_SUSTAIN_S`` at
least half loud, so that a click or a bump in the quiet is not taken for it). A session sees the
audio as it comes, so :class:`SoundBlocks` applies the same rule incrementally, on blocks counted
from the stream's first sample (any chunking finds the same blocks):

* **the onset**: the first loud block that starts ``EDGE_SUSTAIN_S`` at least half loud, known
  once that much audio has arrived (the session cuts the query's hash frames before it, which
  may already be in, :meth:`worker.session.Session.add_hashes`);
* **sustained sound per period**: a period in which no such stretch ends (``EDGE_SUSTAIN_S``
  at least half loud) is quiet whatever its RMS
  (:attr:`worker.session.Session.period_quiet`), so that a lone click does not make a silent
  second count as music (it would have kept the silence after it in the query: a 10 ms click
  5 s before a chorale took ``identify`` from 1.000 to "not in the collection" before the
  offline rule).

Loud here is absolute (``SILENCE_DBFS``): a live stream cannot know its loudest block ahead.
"""

from __future__ import annotations

import numpy as np

from model.features import EDGE_BLOCK_S, EDGE_SUSTAIN_BLOCKS, SILENCE_DBFS

__all__ = ["SUSTAIN_BLOCKS", "SoundBlocks"]

SUSTAIN_BLOCKS = EDGE_SUSTAIN_BLOCKS  # blocks in EDGE_SUSTAIN_S (music_span's window)
MIN_LOUD = -(-SUSTAIN_BLOCKS // 2)  # loud blocks that make sustained sound (at least half)


class SoundBlocks:
    """Stream-aligned ``EDGE_BLOCK_S`` blocks of one stream (see the module docstring).

    Parameters
    ----------
    sample_rate : int
    """

    def __init__(self, sample_rate: int) -> None:
        self.block = max(1, int(round(EDGE_BLOCK_S * sample_rate)))
        self._floor = self.block * 10.0 ** (SILENCE_DBFS / 10.0)  # Σ x² of a block at the floor
        self._acc = 0.0  # Σ x² of the current (incomplete) block
        self._fill = 0  # samples in it
        self.n_blocks = 0  # complete blocks so far
        self._tail = np.zeros(SUSTAIN_BLOCKS - 1, bool)  # loudness of the blocks before
        self.period_blocks = 0  # complete blocks since take_period()
        self.period_run = False  # whether a sustained stretch ended in this period
        self.looking = False  # whether the onset is searched (see look())
        self.onset_block: int | None = None  # the onset found since look()

    def look(self) -> None:
        """Search the onset from here on, forgetting one found before. The blocks just before
        stay in the window: music that started in the last blocks of a period that was quiet
        (too little of it to be sustained there) starts where it did, not up to
        ``EDGE_SUSTAIN_S`` later (an onset before the cleared query's start is clamped to it,
        :meth:`worker.session.Session.add_hashes`)."""
        self.looking, self.onset_block = True, None

    @property
    def onset_sample(self) -> int | None:
        """The stream sample where the music starts (None: not found since :meth:`look`)."""
        return None if self.onset_block is None else self.onset_block * self.block

    def push(self, power: np.ndarray) -> None:
        """Take the next samples' power (``x²``, mean over channels), shape (n,)."""
        p = np.asarray(power, np.float64)
        i = 0
        if self._fill:  # complete the open block
            take = min(self.block - self._fill, p.shape[0])
            self._acc += float(p[:take].sum())
            self._fill += take
            i = take
            if self._fill == self.block:
                self._blocks(np.array([self._acc]))
                self._acc, self._fill = 0.0, 0
        whole = (p.shape[0] - i) // self.block
        if whole:
            end = i + whole * self.block
            self._blocks(p[i:end].reshape(whole, self.block).sum(axis=1))
            i = end
        if i < p.shape[0]:
            self._acc += float(p[i:].sum())
            self._fill += p.shape[0] - i

    def _blocks(self, sums: np.ndarray) -> None:
        """Complete blocks' Σ x²: a sustained stretch ends at a loud block with ``MIN_LOUD``
        loud ones among the ``SUSTAIN_BLOCKS`` that end with it; the onset is the first loud
        block of the first such window (the earliest loud block starting ``EDGE_SUSTAIN_S``
        at least half loud)."""
        k, w = sums.shape[0], SUSTAIN_BLOCKS
        loud = np.concatenate([self._tail, sums > self._floor])  # w - 1 blocks before
        cs = np.concatenate([[0], np.cumsum(loud)])
        ends = np.arange(w - 1, w - 1 + k)  # the new blocks, indices into loud
        runs = loud[ends] & (cs[ends + 1] - cs[ends + 1 - w] >= MIN_LOUD)
        first_new = self.n_blocks
        self.n_blocks += k
        self.period_blocks += k
        self._tail = loud[-(w - 1):].copy() if w > 1 else self._tail
        if not runs.any():
            return
        self.period_run = True
        if self.looking:
            j = int(ends[np.argmax(runs)])
            start = j - w + 1 + int(np.argmax(loud[j - w + 1:j + 1]))  # its first loud block
            self.onset_block = first_new + start - (w - 1)
            self.looking = False

    def take_period(self) -> None:
        """Start the next result period."""
        self.period_blocks, self.period_run = 0, False

    @property
    def period_sustained(self) -> bool:
        """Whether a sustained stretch (``MIN_LOUD`` loud blocks of ``SUSTAIN_BLOCKS``) ended
        in the current period."""
        return self.period_run
