"""Tests of model.resample: any integer rate in 8..96 kHz, streamed, gives the whole signal's
samples, as many as promised, at the right times."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import AudioError
from model.resample import StreamingResampler, resample

OUT = 22050
# Common rates, and odd ones the torchaudio kernel refused (91,403 needed ~10^9 taps).
RATES = [8000, 11025, 16000, 44100, 48000, 91403, 95999, 96000, 8001, 44101]


def _expected_len(n: int, rate: int) -> int:
    return (2 * n * OUT + rate) // (2 * rate)  # floor(n·OUT/rate + 1/2), exactly


def _stream(rate: int, x: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, StreamingResampler]:
    rs = StreamingResampler(rate, OUT)
    parts, i = [], 0
    for n in sizes:
        parts.append(rs.push(x[i:i + n]))
        i += n
    parts += [rs.push(x[i:]), rs.finish()]
    return np.concatenate(parts), rs


@pytest.mark.parametrize("rate", RATES)
def test_any_chunking_gives_the_whole_signal_samples(rate: int) -> None:
    rng = np.random.default_rng(rate)
    x = rng.standard_normal(rate + 123)
    whole = resample(x, rate, OUT)
    assert whole.shape == (_expected_len(x.size, rate),) and whole.dtype == np.float64
    sizes = [int(rng.choice([0, 1, 2, rng.integers(1, 4000), rng.integers(1, 40_000)]))
             for _ in range(60)]
    got, rs = _stream(rate, x, sizes)
    # Bit for bit: libsoxr's stages consume their FIFOs in fixed blocks, whatever came in.
    np.testing.assert_array_equal(got, whole)
    assert (rs.n_in, rs.n_out) == (x.size, whole.size)


@settings(max_examples=60, deadline=None)
@given(rate=st.integers(8000, 96000), n=st.integers(0, 30_000),
       sizes=st.lists(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 20_000)),
                      max_size=30),
       seed=st.integers(0, 2**16))
def test_every_rate_streams_the_whole_signal(rate: int, n: int, sizes: list[int],
                                             seed: int) -> None:
    x = np.random.default_rng(seed).uniform(-1, 1, n)
    whole = resample(x, rate, OUT)
    assert whole.size == _expected_len(n, rate)
    got, _ = _stream(rate, x, sizes)
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("rate", [8000, 11025, 44100, 48000, 91403, 95999])
def test_samples_are_the_signal_at_their_times(rate: int) -> None:
    # A tone in the CQT's range comes out as the same tone, in phase: output sample j is the
    # input signal at j / 22,050 s (libsoxr compensates its filter's delay).
    f = 441.7
    x = np.sin(2 * np.pi * f * np.arange(rate) / rate)
    y = resample(x, rate, OUT)
    want = np.sin(2 * np.pi * f * np.arange(y.size) / OUT)
    mid = slice(2000, y.size - 2000)  # away from the edges' zero padding
    np.testing.assert_allclose(y[mid], want[mid], atol=2e-4)


@settings(max_examples=10, deadline=None)
@given(rate=st.integers(8000, 96000),
       sizes=st.lists(st.integers(1, 3000), min_size=20, max_size=60))
def test_output_waits_no_longer_than_the_lookahead(rate: int, sizes: list[int]) -> None:
    rs = StreamingResampler(rate, OUT)
    assert 0.0 <= rs.lookahead_s < 0.1  # 0 at 22,050 Hz: passed through
    rng = np.random.default_rng(rate)
    for n in sizes:
        rs.push(rng.standard_normal(n))
        assert rs.n_in / rate - rs.n_out / OUT <= rs.lookahead_s + 1e-9


@pytest.mark.parametrize("rate", [0, 7999, 96001, 44100.5, -22050, float("nan"), "44100"])
def test_rates_outside_the_range_are_refused(rate: object) -> None:
    with pytest.raises(AudioError) as e:
        StreamingResampler(rate, OUT)  # type: ignore[arg-type]
    assert e.value.reason == "unsupported_rate" and "8000..96000" in str(e.value)


def test_push_after_finish_is_an_error() -> None:
    rs = StreamingResampler(44100, OUT)
    rs.finish()
    with pytest.raises(RuntimeError):
        rs.push(np.zeros(10))
    with pytest.raises(RuntimeError):
        rs.finish()
