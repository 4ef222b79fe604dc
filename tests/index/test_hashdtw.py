"""Hash-DTW: the fast kernels against a plain-Python DP, a hand-computed table, and each other."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.hashdtw import (
    IncrementalHashDTW,
    hamming_matrix,
    hash_dtw,
    hash_dtw_batch,
    median_hamming,
    pack_bits,
    unpack_bits,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Batch and incremental calls launch the numba thread pool per call: fewer, bigger examples.
POOLED = settings(FAST, max_examples=50)


def reference_dtw(q: np.ndarray, r: np.ndarray, penalty: int, g: float) -> tuple:
    """The original DP (dhs/match.py), written plainly; path length counted in cells."""
    m, n = len(q), len(r)
    d = [[bin(int(q[i]) ^ int(r[j])).count("1") for j in range(n)] for i in range(m)]
    big_d = [row[:] for row in d]
    length = [[1] * n for _ in range(m)]
    for i in range(1, m):
        for j in range(1, n):
            diag = big_d[i - 1][j - 1]
            up, left = big_d[i - 1][j] + penalty, big_d[i][j - 1] + penalty
            if diag <= up and diag <= left:
                big_d[i][j] += diag
                length[i][j] += length[i - 1][j - 1]
            elif up <= left:
                big_d[i][j] += up
                length[i][j] += length[i - 1][j]
            else:
                big_d[i][j] += left
                length[i][j] += length[i][j - 1]
    short = min(m, n)
    gully = min(int(g * short), short - 1)
    bi = min(range(gully, m), key=lambda i: (big_d[i][n - 1], i))
    bj = min(range(gully, n), key=lambda j: (big_d[m - 1][j], j))
    ei, ej = (bi, n - 1) if big_d[m - 1][bj] > big_d[bi][n - 1] else (m - 1, bj)
    return big_d[ei][ej] / length[ei][ej], ej, ei, length[ei][ej]


@st.composite
def pairs(draw, max_len: int = 40):
    """Query/reference hashes; a narrow value range makes ties (the tricky case) common."""
    n_bits = draw(st.sampled_from([16, 32]))
    dtype = np.uint16 if n_bits == 16 else np.uint32
    hi = draw(st.sampled_from([8, 2**n_bits]))
    m = draw(st.integers(1, max_len))
    n = draw(st.integers(1, max_len))
    q = np.array(draw(st.lists(st.integers(0, hi - 1), min_size=m, max_size=m)), dtype=dtype)
    r = np.array(draw(st.lists(st.integers(0, hi - 1), min_size=n, max_size=n)), dtype=dtype)
    penalty = draw(st.integers(0, 12))
    gully = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0))
    return q, r, penalty, gully


@FAST
@given(pairs())
def test_kernel_matches_plain_python(case) -> None:
    q, r, penalty, gully = case
    got = hash_dtw(q, r, penalty=penalty, gully=gully)
    want = reference_dtw(q, r, penalty, gully)
    assert got.score == pytest.approx(want[0], rel=1e-12)
    assert (got.end_j, got.end_i, got.path_length) == want[1:]


def test_long_query_crosses_row_blocks() -> None:
    # > 128 rows runs several wavefront blocks; the block boundary must be invisible.
    rng = np.random.default_rng(3)
    for m, n in [(300, 200), (129, 50), (128, 1), (257, 3)]:
        q = rng.integers(0, 16, m).astype(np.uint16)
        r = rng.integers(0, 16, n).astype(np.uint16)
        got = hash_dtw(q, r, penalty=1, gully=0.9)
        want = reference_dtw(q, r, 1, 0.9)
        assert got.score == pytest.approx(want[0]) and tuple(got)[1:] == want[1:]


def test_hand_computed_table() -> None:
    # Hamming distances          D (phi = 1)        path length (cells)
    #   1 2 3 4                   1 2 3 4            1 1 1 1
    #   1 0 1 2                   1 1 3 5            1 2 2 2
    #   3 2 1 0                   3 3 2 3            1 2 3 3
    # D[1,2]: diagonal 2 ties left 1+1 -> diagonal wins. gully = int(0.9 * 3) = 2: best last-row
    # end is D[2,2] = 2, best last-column end D[2,3] = 3, so the end is (2, 2): score 2 / 3.
    q = np.array([0b0000, 0b0011, 0b1111], dtype=np.uint16)
    r = np.array([0b0001, 0b0011, 0b0111, 0b1111], dtype=np.uint16)
    np.testing.assert_array_equal(
        hamming_matrix(q, r), [[1, 2, 3, 4], [1, 0, 1, 2], [3, 2, 1, 0]]
    )
    res = hash_dtw(q, r, penalty=1, gully=0.9)
    assert res.score == pytest.approx(2 / 3)
    assert (res.end_j, res.end_i, res.path_length) == (2, 2, 3)
    # g = 0 opens the whole last column (best D[2,3] = 3); the last row's D[2,2] = 2 still wins.
    assert tuple(hash_dtw(q, r, penalty=1, gully=0.0))[1:] == (2, 2, 3)


def test_query_longer_than_reference_ends_on_last_column() -> None:
    # The reference is the middle of the query: the path must leave through the last column.
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2**16, 20).astype(np.uint16)
    q = np.concatenate([rng.integers(0, 2**16, 10), r, rng.integers(0, 2**16, 30)]).astype(
        np.uint16
    )
    res = hash_dtw(q, r, penalty=4, gully=0.9)
    assert (res.score, res.end_j, res.end_i, res.path_length) == (0.0, 19, 29, 20)


def test_gully_hides_the_true_end_of_a_slow_query_at_the_piece_start() -> None:
    # The module's streaming caveat: 40 query frames playing reference frames 0..29 (0.75x)
    # truly end at column 29 < int(0.9 * 40) = 36, which only a smaller g admits.
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 2**16, 200).astype(np.uint16)
    query = ref[(np.arange(40) * 0.75).astype(int)]
    assert hash_dtw(query, ref, penalty=4, gully=0.9).end_j >= 36
    assert hash_dtw(query, ref, penalty=4, gully=0.7).end_j == 29


@POOLED
@given(st.lists(pairs(max_len=25), min_size=1, max_size=6), st.sampled_from([16, 32]))
def test_batch_equals_per_pair(cases, n_bits) -> None:
    dtype = np.uint16 if n_bits == 16 else np.uint32
    q = cases[0][0].astype(dtype)
    penalty, gully = cases[0][2], cases[0][3]
    refs = [c[1].astype(dtype) for c in cases]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in refs])])
    batch = hash_dtw_batch(q, np.concatenate(refs), offsets, penalty=penalty, gully=gully)
    assert batch.scores.dtype == np.float32
    for k, r in enumerate(refs):
        one = hash_dtw(q, r, penalty=penalty, gully=gully)
        assert batch.scores[k] == np.float32(one.score)
        assert (batch.end_j[k], batch.end_i[k], batch.path_length[k]) == tuple(one)[1:]


@POOLED
@given(pairs(max_len=60), st.lists(st.integers(0, 60), max_size=6))
def test_incremental_equals_batch(case, cuts) -> None:
    q, r, penalty, gully = case
    refs = np.concatenate([r, r[::-1], r[: max(1, len(r) // 2)]])
    offsets = np.array([0, len(r), 2 * len(r), len(refs)])
    inc = IncrementalHashDTW(refs, offsets, penalty=penalty, gully=gully)
    for chunk in np.split(q, sorted({c % (len(q) + 1) for c in cuts})):
        if inc.n_frames + len(chunk) == 0:
            continue
        got = inc.append(chunk)
        want = hash_dtw_batch(q[: inc.n_frames], refs, offsets, penalty=penalty, gully=gully)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert inc.n_frames == len(q)
    # rebuild = a fresh query
    tail = q[len(q) // 2:]
    for a, b in zip(
        inc.rebuild(tail), hash_dtw_batch(tail, refs, offsets, penalty=penalty, gully=gully),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_incremental_grows_history_and_reports_memory() -> None:
    rng = np.random.default_rng(1)
    refs = rng.integers(0, 2**32, 300, dtype=np.uint64).astype(np.uint32)
    offsets = np.array([0, 100, 100, 300])  # the middle reference is empty
    inc = IncrementalHashDTW(refs, offsets, penalty=15)
    q = rng.integers(0, 2**32, 200, dtype=np.uint64).astype(np.uint32)
    for k in range(0, 200, 7):
        out = inc.append(q[k:k + 7])
    want = hash_dtw_batch(q, refs, offsets, penalty=15)
    for a, b in zip(out, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert out.scores[1] == np.inf and out.end_j[1] == -1 and out.path_length[1] == 0
    assert inc.nbytes >= 8 * (300 + 3 * 200)
    inc.reset()
    with pytest.raises(ValueError, match="empty"):
        inc.append(q[:0])


def test_read_only_memory_mapped_style_inputs() -> None:
    # The index hands out read-only memory maps; the kernels must take them as they are.
    rng = np.random.default_rng(4)
    refs = rng.integers(0, 2**16, 100).astype(np.uint16)
    q = refs[10:30].copy()
    refs.setflags(write=False)
    q.setflags(write=False)
    offsets = np.array([0, 50, 100])
    offsets.setflags(write=False)
    res = hash_dtw_batch(q, refs, offsets, penalty=3)
    assert res.scores[0] == 0.0 and res.end_j[0] == 29
    assert IncrementalHashDTW(refs, offsets, penalty=3).append(q).end_j[0] == 29


def test_length_one_and_empty() -> None:
    one = np.array([5], dtype=np.uint16)
    seq = np.array([1, 5, 7, 5], dtype=np.uint16)
    # a one-frame query matches its best frame; the first best frame wins ties
    assert tuple(hash_dtw(one, seq, penalty=2)) == (0.0, 1, 0, 1)
    # a one-frame reference: every query frame is on the last column; D[1,0] = 0 ties the last
    # row's D[3,0] = 0, and ties go to the last row (the original's order)
    assert tuple(hash_dtw(seq, one, penalty=2)) == (0.0, 0, 3, 1)
    assert tuple(hash_dtw(one, one, penalty=0)) == (0.0, 0, 0, 1)
    with pytest.raises(ValueError, match="empty"):
        hash_dtw(one[:0], seq, penalty=2)
    with pytest.raises(ValueError, match="empty"):
        hash_dtw(one, seq[:0], penalty=2)
    with pytest.raises(ValueError, match="empty"):
        hash_dtw_batch(one[:0], seq, np.array([0, 4]), penalty=2)
    res = hash_dtw_batch(one, seq, np.array([0, 0, 4, 4]), penalty=2)
    np.testing.assert_array_equal(res.scores, [np.inf, 0.0, np.inf])
    np.testing.assert_array_equal(res.end_j, [-1, 1, -1])
    empty = hash_dtw_batch(one, seq[:0], np.array([0]), penalty=2)
    assert empty.scores.shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"penalty": -1}, "penalty"),
        ({"penalty": 1.5}, "penalty"),
        ({"penalty": 2, "gully": 1.5}, "gully"),
        ({"penalty": 2**28}, "overflow"),
    ],
)
def test_bad_parameters(kwargs, match) -> None:
    q = np.zeros(3, np.uint16)
    with pytest.raises(ValueError, match=match):
        hash_dtw(q, q, **kwargs)


def test_bad_inputs() -> None:
    q = np.zeros(3, np.uint16)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        hash_dtw(q.astype(np.int64), q, penalty=1)
    with pytest.raises(ValueError, match="bit widths"):
        hash_dtw(q, q.astype(np.uint32), penalty=1)
    with pytest.raises(ValueError, match="1-D"):
        hash_dtw(q[None], q, penalty=1)
    with pytest.raises(ValueError, match="offsets"):
        hash_dtw_batch(q, q, np.array([0, 2, 1, 3]), penalty=1)
    with pytest.raises(ValueError, match="offsets"):
        hash_dtw_batch(q, q, np.array([0, 2]), penalty=1)
    with pytest.raises(ValueError, match="offsets"):
        hash_dtw_batch(q, q, np.array([[0, 3]]), penalty=1)


@pytest.mark.parametrize("n_bits", [16, 32])
def test_pack_bits_round_trip(n_bits) -> None:
    rng = np.random.default_rng(n_bits)
    outputs = rng.uniform(-1, 1, (50, n_bits))
    packed = pack_bits(outputs)
    assert packed.dtype == (np.uint16 if n_bits == 16 else np.uint32)
    np.testing.assert_array_equal(unpack_bits(packed), outputs > 0)
    # bit i is output i, LSB first; 0 is not > 0
    first = np.zeros((1, n_bits))
    first[0, [0, 3, n_bits - 1]] = [0.2, 1.0, 0.9]
    assert int(pack_bits(first)[0]) == 1 + 8 + 2 ** (n_bits - 1)
    # Hamming distance = differing signs
    np.testing.assert_array_equal(
        hamming_matrix(packed[:5], packed),
        ((outputs[:5, None] > 0) != (outputs[None] > 0)).sum(-1),
    )


def test_pack_bits_rejects() -> None:
    with pytest.raises(ValueError, match="shape"):
        pack_bits(np.zeros((4, 8)))
    with pytest.raises(ValueError, match="NaN"):
        pack_bits(np.full((2, 16), np.nan))


def test_median_hamming_is_the_lower_median() -> None:
    rng = np.random.default_rng(2)
    for n_bits, dtype in [(16, np.uint16), (32, np.uint32)]:
        q = rng.integers(0, 2**n_bits, 17, dtype=np.uint64).astype(dtype)
        r = rng.integers(0, 2**n_bits, 30, dtype=np.uint64).astype(dtype)
        flat = np.sort(hamming_matrix(q, r).ravel())
        assert median_hamming(q, r) == flat[(flat.size - 1) // 2]
    assert median_hamming(np.array([0], np.uint16), np.array([0, 3], np.uint16)) == 0


# --- the GIL ------------------------------------------------------------------------------------

def longest_stall(fn, *, min_s: float = 0.15) -> tuple[float, float]:
    """Run ``fn`` on a thread while this one ticks in Python; (fn's seconds, longest tick gap
    within them). A kernel that holds the GIL stalls the ticks for its whole run, as it would the
    worker's lease timer or the gateway's event loop."""
    import threading
    import time

    span: list[float] = []

    def run() -> None:
        span.append(time.perf_counter())
        fn()
        span.append(time.perf_counter())

    t = threading.Thread(target=run)
    ticks = [time.perf_counter()]
    t.start()
    while t.is_alive():
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    t0, t1 = span
    inside = [t0] + [x for x in ticks if t0 < x < t1] + [t1]
    assert t1 - t0 >= min_s, f"the kernel ran {t1 - t0:.3f} s: too short to tell"
    return t1 - t0, float(np.diff(inside).max())


@pytest.mark.parametrize("kind", ["pair", "batch", "incremental"])
def test_the_kernels_release_the_gil(kind: str) -> None:
    import time

    rng = np.random.default_rng(5)
    q = rng.integers(0, 1 << 16, 1000, dtype=np.uint16)

    def call(n: int):
        """The kernel over ``n`` reference frames (two references), as a no-argument call."""
        r = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        offsets = np.array([0, n // 2, n])
        return {"pair": lambda: hash_dtw(q, r, penalty=4),
                "batch": lambda: hash_dtw_batch(q, r, offsets, penalty=4),
                "incremental": lambda: IncrementalHashDTW(r, offsets, penalty=4).append(q)}[kind]

    call(50)()  # compiled (or loaded from the cache) before the timing
    # Long enough to tell on any machine: the kernels run in parallel, so a fixed size that
    # takes 0.17 s on 2 cores ran 0.138 s on a quiet one and would be far shorter on 16.
    n = 400_000
    while True:
        fn = call(n)
        t = time.perf_counter()
        fn()
        took = time.perf_counter() - t
        if took >= 0.4 or n >= 64_000_000:
            break
        n = int(n * min(8.0, 0.6 / max(took, 1e-3)))
    seconds, stall = longest_stall(fn)
    assert stall < 0.5 * seconds, f"ticks stalled {stall:.3f} s of a {seconds:.3f} s kernel"


def test_two_threads_run_the_parallel_kernels_at_once() -> None:
    # nogil lets two threads launch the prange kernels together (the worker's tick and another
    # thread); numba's omp/tbb layers take that, its workqueue layer would abort the process.
    import threading

    rng = np.random.default_rng(6)
    q = rng.integers(0, 1 << 16, 300, dtype=np.uint16)
    r = rng.integers(0, 1 << 16, 60_000, dtype=np.uint16)
    offsets = np.linspace(0, r.size, 13).astype(np.int64)
    want = hash_dtw_batch(q, r, offsets, penalty=3)
    got: list = [None] * 4

    def run(i: int) -> None:
        got[i] = hash_dtw_batch(q, r, offsets, penalty=3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in got:
        for a, b in zip(g, want, strict=True):
            np.testing.assert_array_equal(a, b)
