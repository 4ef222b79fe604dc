"""bench/time_to_identify.py --save-calibration: the stream calibration it saves says what it
was fitted on (renderer, conditions, streams, index size, command)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

import index.calibration
from bench.time_to_identify import calibrate
from index.calibration import Calibration, Fit, Provenance


def trace(top: str, conf: float, n: int = 6) -> list[tuple]:
    return [(float(i + 1), top, conf, 10.0 + i) for i in range(n)]


@pytest.mark.parametrize("renderer", ["csound-fm", "timidity-freepats,adplay-opl3"])
def test_the_saved_stream_calibration_records_its_provenance(monkeypatch, capsys, renderer):
    saved = []
    monkeypatch.setattr(index.calibration, "save_calibration",
                        lambda cal, path=None: saved.append(cal) or "cal.json")
    monkeypatch.setattr(sys, "argv", ["bench/time_to_identify.py", "--calibrate",
                                      "--save-calibration", "--renderer", renderer])
    queries = Fit(renderers=("timidity-freepats",), n_in=992, n_out=1100)
    cascade = SimpleNamespace(index=[None] * 7, calibration=Calibration(
        "m", threshold=0.6, n_in=992, n_out=1100, provenance=Provenance(queries=queries)))
    pieces = [{"true_id": "a"}, {"true_id": "b"}, {"true_id": None}, {"true_id": None},
              {"true_id": None}]
    outcomes = [{"in_collection": True, "duplicate": False, "trace": trace("a", 0.9)},
                {"in_collection": True, "duplicate": False, "trace": trace("b", 0.95)},
                {"in_collection": False, "duplicate": False, "trace": trace("x", 0.3)},
                {"in_collection": False, "duplicate": True, "trace": trace("a", 0.99)},
                {"in_collection": False, "duplicate": False, "trace": trace("y", 0.4)}]
    args = SimpleNamespace(starts=2, seconds=20.0, renderer=renderer, keep_step=False,
                           save_calibration=True)
    calibrate(cascade, pieces, {"clean": outcomes, "room_noise": outcomes}, args, "calib")
    (cal,) = saved
    s = cal.provenance.streams
    # every renderer the streams were pooled from (--renderer A,B: a calibration across engines)
    assert s.renderers == tuple(sorted(renderer.split(",")))
    assert s.conditions == ("clean", "room_noise")
    assert (s.n_in, s.n_out, s.index_refs) == (4, 4, 7)  # the duplicate is no outsider
    assert s.command == ("python bench/time_to_identify.py --calibrate --save-calibration "
                         f"--renderer {renderer}") and s.date_utc
    assert cal.provenance.queries == queries  # the single-query part is kept
    assert cal.stream_threshold is not None  # a stream fit was made
    assert "saved to cal.json" in capsys.readouterr().out


@pytest.mark.parametrize("fit_shape", [False, True])
def test_fit_shape_stores_the_chosen_shape_with_its_threshold(monkeypatch, capsys, fit_shape):
    from index.evidence import DEFAULT_PARAMS, params_of

    saved = []
    monkeypatch.setattr(index.calibration, "save_calibration",
                        lambda cal, path=None: saved.append(cal) or "cal.json")
    monkeypatch.setattr(sys, "argv", ["bench/time_to_identify.py", "--calibrate"])
    monkeypatch.setattr("index.evidence.SHAPE_GRID", {"step_bonus": (0.0, 3.0)})
    cascade = SimpleNamespace(index=[None] * 7, calibration=Calibration("m", threshold=0.6))

    def events(top: str, conf: float, step: float, n: int = 12) -> list:
        return [[float(t), [[top if step else f"{top}{t}", conf, 10.0 + step * t],
                            ["z", 0.9 * conf, 3.0]]] for t in range(2, 2 + n)]

    # outsiders: a new top every result (never in step); in-collection: in step at 0.6
    outs = [{"in_collection": False, "duplicate": False, "events": events(f"o{k}", 0.9, 0.0)}
            for k in range(30)]
    ins = [{"in_collection": True, "duplicate": False, "events": events("a", 0.6, 1.0)}
           for _ in range(4)]
    pieces = [{"true_id": "a"}] * 4 + [{"true_id": None}] * 30
    args = SimpleNamespace(starts=1, seconds=14.0, renderer="timidity-freepats",
                           keep_step=False, save_calibration=True, fit_shape=fit_shape)
    calibrate(cascade, pieces, {"clean": ins + outs}, args, "calib")
    (cal,) = saved
    shape = params_of(cal)
    if fit_shape:  # in step pays only for the true piece here: the larger bonus is chosen
        assert shape.step_bonus == 3.0 and "evidence shapes" in capsys.readouterr().out
    else:
        assert shape == DEFAULT_PARAMS
    assert cal.stream["evidence"]["params"] == shape.to_dict()
