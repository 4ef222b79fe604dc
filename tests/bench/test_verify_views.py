"""bench/verify_views.py and bench/_common.query_cells: each query phase is hashed from its own
first frame, and the cells hold only their in-collection queries."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from bench._common import query_cells
from bench.verify_views import phase_costs


def test_each_phase_hashes_the_view_from_its_own_first_frame():
    seen = []

    def hashes(frames, modality):
        seen.append((int(frames[0, 0]), frames.shape[0], modality))
        return np.full(frames.shape[0] // 4, int(frames[0, 0]), np.uint32)

    def verify_scores(query, refs):  # a cost that says which phase it was given
        return np.full(refs.shape[0], float(query[0]) + 0.1 * refs, np.float32)

    cascade = SimpleNamespace(encoder=SimpleNamespace(hashes=hashes), verify_scores=verify_scores)
    view = np.repeat(np.arange(40, dtype=np.float32)[:, None], 48, axis=1)  # frame k reads k
    costs = phase_costs(cascade, view, np.array([3, 5]))
    assert costs.shape == (4, 2)
    assert seen == [(p, 40 - p, "audio") for p in range(4)]
    np.testing.assert_allclose(costs, [[p + 0.3, p + 0.5] for p in range(4)], rtol=1e-6)


def test_query_cells_selects_each_cells_in_collection_queries(monkeypatch):
    from index.evaluation import evalset, evaluate

    queries = [{"condition": c, "length_s": n, "piece": i}
               for i, (c, n) in enumerate([("clean", 10), ("clean", 5), ("room_noise", 10),
                                           ("clean", 10), ("clean", 10)])]
    monkeypatch.setattr(evalset, "load_queries", lambda folder: (queries, ["f"] * 5))
    monkeypatch.setattr(evaluate, "true_refs", lambda refs, qs: [7, 8, 9, None, 11])
    cascade = SimpleNamespace(index=SimpleNamespace(refs=[]))
    cells = list(query_cells(cascade, {"a": "dir"}, ["a"], [("clean", 10.0), ("room_noise", 10.0)]))
    assert [(c[0], c[1], c[2], c[6]) for c in cells] == [("a", "clean", 10.0, [0, 4]),
                                                          ("a", "room_noise", 10.0, [2])]
    first = list(query_cells(cascade, {"a": "dir"}, ["a"], [("clean", 10.0)], max_queries=1))
    assert first[0][6] == [0]
