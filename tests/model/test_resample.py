"""Tests of model.resample: the streaming resampler gives torchaudio's whole-signal samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from model.resample import StreamingResampler


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 32000, 44100, 48000, 96000])
def test_streaming_resampler_equals_torchaudio(rate: int) -> None:
    rng = np.random.default_rng(rate)
    x = rng.standard_normal(rate + 123).astype(np.float32)
    ref = torchaudio.functional.resample(torch.from_numpy(x), rate, 22050).numpy()
    rs = StreamingResampler(rate, 22050, torch.device("cpu"))
    parts, i = [], 0
    while i < x.size:
        n = int(rng.choice([0, 1, rng.integers(1, 4000)]))
        parts.append(rs.push(x[i:i + n].astype(np.float64)))
        i += n
    got = np.concatenate(parts + [rs.finish()])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)
