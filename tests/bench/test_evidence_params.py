"""bench/evidence_params.py: the confidence ratios and the parameter grid, on a tiny file."""

from __future__ import annotations

import json

from bench.evidence_params import grid_rows, load, ratios


def test_ratios_and_grid_on_recorded_events(tmp_path):
    def stream(top, conf, in_collection, pos_step=1.0):
        events = [[float(t), [[top, conf, 10.0 + pos_step * t], ["z", 0.01, 3.0]]]
                  for t in range(2, 14)]
        return {"in_collection": in_collection, "true_id": top if in_collection else None,
                "duplicate": False, "events": [[2.0, None], *events]}

    outs = [stream(f"o{k}", 0.05 * (k % 5), False, pos_step=7.0) for k in range(20)]
    ins = [stream("t", 0.95, True) for _ in range(5)]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"outcomes": {"clean": ins + outs}}))
    got_in, got_out = load([path])
    assert len(got_in) == 5 and len(got_out) == 20
    rows, steps = ratios(got_in, got_out)
    high = next(r for r in rows if r["confidence"] == "[0.95, 0.98)")
    assert high["true tops"] == 5 * 12 and high["outsider tops"] == 0 and high["log ratio"] > 3
    assert steps["true"] == 1.0 and steps["outsider"] == 0.0  # the outsiders jump 7 s a second
    best = grid_rows(got_in, got_out, 0.0)[0]
    assert best["clean in 20 s %"] == 100.0 and best["median s"] <= 8.0


def test_a_reset_forgets_the_positions_seen_and_a_restart_keeps_them(tmp_path):
    """As the rule: after a reset the next step is not judged; after a restart (or an old
    file's None) it is, so a jump across the restart counts as a jump."""
    from index.evidence import RESET, RESTART

    def stream(marker):
        ev = [[float(t), [["t", 0.9, 10.0 + t]]] for t in range(2, 8)]
        ev.append([7.5, marker])
        ev += [[float(t), [["t", 0.9, 60.0 + t]]] for t in range(8, 14)]  # 50 s further on
        return {"in_collection": True, "true_id": "t", "duplicate": False, "events": ev}

    outs = [{"in_collection": False, "true_id": None, "duplicate": False,
             "events": [[2.0, [["o", 0.1, 1.0]]]]}]
    means = {}
    for name, marker in (("reset", RESET), ("restart", RESTART), ("old", None)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"outcomes": {"clean": [stream(marker), *outs]}}))
        got_in, got_out = load([path])
        assert got_in[0][0][6] == (7.5, marker)  # the marker read back as it is
        means[name] = ratios(got_in, got_out)[1]["true"]
    assert means["reset"] == 1.0  # 10 steps, all kept
    assert means["restart"] == means["old"] == 10 / 11  # the jump across the restart counted


def test_compare_replays_the_default_and_the_fitted_shape_on_test_files(tmp_path, monkeypatch):
    from bench.evidence_params import compare_rows

    monkeypatch.setattr("index.evidence.SHAPE_GRID", {"step_bonus": (1.0, 3.0)})

    def stream(top, conf, in_collection, step):
        second = 0.9 * conf if in_collection else 0.01  # a close runner-up / a clear lead
        events = [[float(t), [[top if step else f"{top}{t}", conf, 10.0 + step * t],
                              ["z", second, 3.0]]] for t in range(2, 14)]
        return {"in_collection": in_collection, "true_id": top if in_collection else None,
                "duplicate": False, "events": events}

    def write(name, n_out):
        outs = [stream(f"o{k}", 0.97, False, 0.0) for k in range(n_out)]  # never in step
        ins = [stream("t", 0.6, True, 1.0) for _ in range(4)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"outcomes": {"clean": ins + outs}}))
        return path

    calib_in, calib_out = load([write("calib", 30)])
    rows = compare_rows(calib_in, calib_out, [write("tti-test-x", 10)], 0.01)
    by_shape = {r["shape"]: r for r in rows}
    assert set(by_shape) == {"default", "fitted"} and rows[0]["file"] == "tti-test-x"
    # the in-step true piece gains more with the fitted (larger) step bonus: decided sooner
    assert by_shape["fitted"]["median s"] < by_shape["default"]["median s"]
    assert all(r["n"] == 4 and r["out decided"] == "0 / 10" and r["wrong first"] == 0
               for r in rows)


def test_the_outsider_tail_names_the_pieces_and_the_reference_they_hold(tmp_path):
    from bench.evidence_params import outsider_tail
    from index.evidence import EvidenceParams

    def stream(path, tops, conf, in_collection=False):
        return {"in_collection": in_collection, "true_id": None, "duplicate": False,
                "path": f"/corpus/{path}.mid", "start_s": 12.5,
                "events": [[float(t), [[top, conf, 10.0 + t], ["z", 0.01, 3.0]]]
                           for t, top in zip(range(2, 2 + len(tops)), tops, strict=True)]}

    outcomes = {"clean": [stream("stuck", ["r1"] * 8 + ["r2"] * 2, 0.95),
                          stream("wandering", [f"q{k}" for k in range(10)], 0.4),
                          stream("inside", ["t"] * 10, 0.99, in_collection=True)],
                "room_noise": [stream("stuck", ["r1"] * 5, 0.9)]}
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"outcomes": outcomes}))
    rows = outsider_tail(load([path])[1], EvidenceParams(), n=2)
    assert [(r["piece"], r["condition"]) for r in rows] == [("stuck.mid", "clean"),
                                                            ("stuck.mid", "room_noise")]
    assert rows[0]["top most often"] == "r1" and rows[0]["results on top"] == 8
    assert rows[0]["peak"] > rows[1]["peak"] > 0 and rows[0]["start s"] == 12.5
