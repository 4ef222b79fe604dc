"""bench/soft_verify.py: the asymmetric distance is the Hamming distance on hard outputs and
weighs an unsure unit by its size."""

from __future__ import annotations

import numpy as np

from bench.soft_verify import soft_cost
from model.bits import hamming_matrix, pack_bits


def test_soft_cost_is_hamming_on_hard_outputs_and_halves_an_unsure_unit():
    rng = np.random.default_rng(0)
    a = np.sign(rng.standard_normal((7, 32))).astype(np.float32)
    refs = pack_bits(rng.standard_normal((11, 32)))
    np.testing.assert_allclose(soft_cost(a, refs), hamming_matrix(pack_bits(a), refs))
    unsure = a.copy()
    unsure[:, 0] = 0.0  # a unit the network cannot decide counts half, matching or not
    d = soft_cost(unsure, refs) - soft_cost(a, refs)
    assert np.all(np.isin(np.round(d, 6), [-0.5, 0.5]))
