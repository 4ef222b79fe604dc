"""Hash-DTW speed against float DTW on the same pairs: cells/s per core and time per pair.

    python bench/hashdtw.py [--refs 32] [--librosa-pairs 2] [--repeat 5]

A 10 s query against 3-minute references, both rendered from procedural pieces with
``midi_to_frames_fast``: 216 x 3,876 CQT frames for float DTW (48-d cosine distance, distance
matrix included), and their hashes (random projection to 16 or 32 bits of 4-frame means, the
hash rate being the CQT frame rate / 4) for hash-DTW: 54 x 969 hash frames. Baselines in the
same run on the same content: the numba float subsequence DTW (``index.align``, no traceback)
and ``librosa.sequence.dtw(C=..., subseq=True, backtrack=False)`` on fewer pairs. Every time is
the best of ``--repeat`` runs (this machine is shared; the minimum is the least disturbed).
Targets: >= 1 G cells/s per core, >= 100x faster per pair than float DTW.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Per-core figures: BLAS (the cosine matrix of the float baseline) on one thread too. Must be
# set before numpy loads its BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import best_time, machine, table  # noqa: E402

QUERY_S = 10.0
REF_S = 180.0
DOWNSAMPLE = 4


def to_hashes(frames: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Stand-in for the hash network: 4-frame means, random projection, sign bits."""
    from index.hashdtw import pack_bits

    n = frames.shape[0] // DOWNSAMPLE * DOWNSAMPLE
    pooled = frames[:n].reshape(-1, DOWNSAMPLE, frames.shape[1]).mean(axis=1)
    centred = pooled - pooled.mean(axis=1, keepdims=True)
    return pack_bits(centred @ projection)


def make_data(n_refs: int) -> tuple[np.ndarray, list[np.ndarray]]:
    from model.fastrender import demo_piece, midi_to_frames_fast
    from model.features import FRAME_RATE

    refs = [midi_to_frames_fast(demo_piece(REF_S, seed=k))[: int(REF_S * FRAME_RATE)]
            for k in range(n_refs)]
    query_piece = midi_to_frames_fast(demo_piece(60.0, seed=1000))
    start = int(20 * FRAME_RATE)
    return query_piece[start:start + int(QUERY_S * FRAME_RATE)], refs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refs", type=int, default=32, help="3-minute references (pairs)")
    ap.add_argument("--librosa-pairs", type=int, default=2, help="pairs for librosa (slow)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per timing; the best is kept")
    args = ap.parse_args()

    import librosa
    import numba

    from index.align import cosine_distance, subsequence_dtw
    from index.hashdtw import (
        IncrementalHashDTW,
        hash_dtw,
        hash_dtw_batch,
        median_hamming,
    )

    query, refs = make_data(args.refs)
    float_cells = query.shape[0] * sum(r.shape[0] for r in refs)
    rows: list[dict] = []

    # Float DTW baselines, one thread: numba kernel (distance matrix included), then librosa.
    numba.set_num_threads(1)

    # phi is fixed beforehand: np.median of the matrix alone costs more than the DP (reported
    # as its own row), and hash-DTW gets its phi for free too.
    phis = [float(np.median(cosine_distance(query, r))) for r in refs]

    def float_all() -> None:
        for r, phi in zip(refs, phis, strict=True):
            subsequence_dtw(cosine_distance(query, r), penalty=phi, gully=0.96)

    t_float = best_time(float_all, args.repeat) / len(refs)
    rows.append({"method": "float DTW, numba (cosine + DP)", "bits": "-", "threads": 1,
                 "cells": f"{query.shape[0]}x{refs[0].shape[0]}",
                 "cells/s": float_cells / len(refs) / t_float,
                 "us/pair": t_float * 1e6, "hash speed-up": 1.0})

    matrix = cosine_distance(query, refs[0])
    t_median = best_time(lambda: np.median(matrix), args.repeat)
    rows.append({"method": "(phi = np.median of one float matrix)", "bits": "-", "threads": 1,
                 "cells": f"{query.shape[0]}x{refs[0].shape[0]}", "cells/s": "-",
                 "us/pair": t_median * 1e6, "hash speed-up": "-"})

    lib = list(zip(refs, phis, strict=True))[: args.librosa_pairs]

    def librosa_all() -> None:
        for r, phi in lib:
            librosa.sequence.dtw(C=cosine_distance(query, r), subseq=True, backtrack=False,
                                 weights_add=np.array([0.0, phi, phi]))

    t_lib = best_time(librosa_all, max(1, args.repeat // 2)) / len(lib)
    rows.append({"method": "float DTW, librosa subseq", "bits": "-", "threads": 1,
                 "cells": f"{query.shape[0]}x{refs[0].shape[0]}",
                 "cells/s": float_cells / len(refs) / t_lib,
                 "us/pair": t_lib * 1e6, "hash speed-up": t_float / t_lib})

    rng = np.random.default_rng(0)
    for n_bits in (16, 32):
        projection = rng.standard_normal((query.shape[1], n_bits))
        q_hash = to_hashes(query, projection)
        r_hash = [to_hashes(r, projection) for r in refs]
        concat = np.concatenate(r_hash)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in r_hash])])
        phi = median_hamming(q_hash, concat)
        cells = q_hash.shape[0] * concat.shape[0]
        shape = f"{q_hash.shape[0]}x{r_hash[0].shape[0]}"

        numba.set_num_threads(1)

        def pairs(q_hash=q_hash, r_hash=r_hash, phi=phi) -> None:
            for r in r_hash:
                hash_dtw(q_hash, r, penalty=phi)

        t_pair = best_time(pairs, args.repeat) / len(refs)
        rows.append({"method": f"hash-DTW per pair (phi={phi})", "bits": n_bits, "threads": 1,
                     "cells": shape, "cells/s": cells / len(refs) / t_pair,
                     "us/pair": t_pair * 1e6, "hash speed-up": t_float / t_pair})
        for threads in (1, 2):
            numba.set_num_threads(threads)
            t_batch = best_time(
                lambda q_hash=q_hash, concat=concat, offsets=offsets, phi=phi: hash_dtw_batch(
                    q_hash, concat, offsets, penalty=phi), args.repeat) / len(refs)
            rows.append({"method": "hash-DTW batch (prange)", "bits": n_bits,
                         "threads": threads, "cells": shape,
                         "cells/s": cells / len(refs) / t_batch, "us/pair": t_batch * 1e6,
                         "hash speed-up": t_float / t_batch})

        # Streaming: one new hash frame (~0.19 s of audio) against every reference.
        numba.set_num_threads(1)
        inc = IncrementalHashDTW(concat, offsets, penalty=phi)
        inc.append(q_hash[:-1])

        def step(inc=inc, frame=q_hash[-1:]) -> None:
            inc.append(frame)

        t_step = best_time(step, args.repeat) / len(refs)
        rows.append({"method": "incremental append, 1 frame", "bits": n_bits, "threads": 1,
                     "cells": f"1x{r_hash[0].shape[0]}",
                     "cells/s": r_hash[0].shape[0] / t_step, "us/pair": t_step * 1e6,
                     "hash speed-up": "-"})

    print(f"# hash-DTW vs float DTW — {machine()}, numba {numba.__version__}, "
          f"librosa {librosa.__version__}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"# {len(refs)} pairs ({args.librosa_pairs} for librosa): a {QUERY_S:.0f} s query vs "
          f"{REF_S:.0f} s references; best of {args.repeat}; "
          "speed-up = float numba us/pair / this us/pair")
    print(table(rows))


if __name__ == "__main__":
    main()
