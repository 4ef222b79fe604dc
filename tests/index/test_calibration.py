"""Calibration on synthetic confidence distributions: the threshold, its file, the fallback."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from index.calibration import (
    Calibration,
    Fit,
    Provenance,
    calibrate,
    check_calibration_file,
    describe,
    load_calibration,
    min_outsiders,
    save_calibration,
    uncalibrated_warning,
)
from model.errors import MidimatchError


def test_calibrate_keeps_at_most_one_percent_of_out_of_collection_confident():
    rng = np.random.default_rng(0)
    out = rng.beta(2, 5, 1000)  # mostly low
    inn = rng.beta(8, 2, 500)  # mostly high
    cal = calibrate(inn, out, model_id="m")
    assert cal.false_rate <= 0.01
    assert np.mean(out >= cal.threshold) == cal.false_rate
    # the smallest such threshold: the 11th largest out value is the first one excluded
    eleventh = np.sort(out)[::-1][10]
    assert eleventh < cal.threshold <= np.nextafter(eleventh, 1.0)
    assert np.mean(out >= eleventh) > 0.01
    assert cal.recall == pytest.approx(np.mean(inn >= cal.threshold))
    assert 0.5 < cal.recall < 1.0
    assert cal.n_in == 500 and cal.n_out == 1000


def test_recall_counts_only_right_answers():
    inn = np.array([0.9, 0.95, 0.99, 0.2])
    out = np.linspace(0.0, 0.5, 100)
    right = calibrate(inn, out, model_id="m")
    assert right.recall == pytest.approx(0.75)
    wrong = calibrate(inn, out, model_id="m", in_correct=[True, False, True, True])
    assert wrong.recall == pytest.approx(0.5)
    with pytest.raises(ValueError, match="in_correct"):
        calibrate(inn, out, model_id="m", in_correct=[True])


def test_separable_distributions_give_full_recall_and_ties_are_excluded():
    out = np.array([0.1] * 50 + [0.4] * 50)  # many ties at the top
    inn = np.array([0.6, 0.8])
    cal = calibrate(inn, out, model_id="m")
    assert cal.threshold > 0.4 and cal.false_rate == 0.0 and cal.recall == 1.0


def test_out_of_collection_at_full_confidence_means_never_confident():
    cal = calibrate([1.0, 1.0], [1.0] * 10, model_id="m")
    assert cal.threshold == math.inf and cal.recall == 0.0 and cal.false_rate == 0.0
    assert not cal.is_confident(1.0)
    with pytest.raises(ValueError, match="out-of-collection"):
        calibrate([0.5], [], model_id="m")


def test_a_false_rate_needs_one_over_it_outsiders_to_be_bounded():
    """Under 1/rate outsiders none may be confident, and the threshold is a fact of the sample:
    one outsider at confidence 0 gave 5e-324, every query identified."""
    assert min_outsiders() == min_outsiders(0.01) == 100
    assert min_outsiders(0.05) == 20 and min_outsiders(0.3) == 4
    assert calibrate([0.9], [0.0], model_id="m").threshold == 5e-324
    # from 100 on, one outsider in a hundred may be confident: the threshold is a rate's
    assert calibrate([0.9], np.r_[np.zeros(99), 0.5], model_id="m").false_rate == 0.01
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            min_outsiders(bad)


def test_check_calibration_file_says_before_a_run_what_saving_would_say_after(tmp_path):
    assert check_calibration_file(tmp_path / "new.json") == tmp_path / "new.json"
    save_calibration(Calibration("a", threshold=0.8), tmp_path / "old.json")
    check_calibration_file(tmp_path / "old.json")  # its other models' entries are kept
    (tmp_path / "bad.json").write_text("{not json")
    for path, said in ((tmp_path / "bad.json", "cannot read calibration"),
                       (tmp_path / "no" / "cal.json", "no folder"),
                       (tmp_path, "is a folder")):
        with pytest.raises(MidimatchError, match=said) as e:
            check_calibration_file(path)
        assert e.value.reason == "bad_calibration"


def test_save_and_load_round_trip_keyed_by_model(tmp_path):
    path = tmp_path / "cal.json"
    a = calibrate([0.9], np.linspace(0, 0.6, 200), model_id="a", source="synthetic")
    save_calibration(a, path)
    save_calibration(Calibration("b", threshold=0.8), path)
    assert load_calibration("a", path) == a
    assert uncalibrated_warning(load_calibration("a", path)) is None
    assert load_calibration("b", path).threshold == 0.8
    blob = json.loads(path.read_text())
    assert blob["format"] == "midimatch-calibration/1" and set(blob["models"]) == {"a", "b"}
    never = calibrate([1.0], [1.0], model_id="c")
    save_calibration(never, path)
    assert load_calibration("c", path).threshold == math.inf
    with pytest.raises(MidimatchError, match="no calibration for model"):
        load_calibration("zzz", path)
    with pytest.raises(MidimatchError, match="no calibration file"):
        load_calibration("a", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MidimatchError) as e:
        load_calibration("a", tmp_path / "bad.json")
    assert e.value.reason == "bad_calibration"


def test_default_file_falls_back_for_unknown_models_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="index.calibration"):
        cal = load_calibration("a-model-nobody-calibrated")
    assert cal.threshold == 0.5 and cal.false_rate is None and not cal.calibrated
    warning = uncalibrated_warning(cal)
    assert "a-model-nobody-calibrated is not calibrated" in warning
    assert "--save-calibration" in warning  # how to calibrate
    assert warning in caplog.text and "has no entry for it" in caplog.text
    with pytest.raises(ValueError):
        Calibration("m", threshold=1.5)


# --- provenance ----------------------------------------------------------------------------------

def test_provenance_round_trips_through_the_file(tmp_path):
    path = tmp_path / "cal.json"
    fit = Fit.now(renderers=["timidity-freepats", "csound-fm", "csound-fm"],
                  conditions=["room_noise", "clean"], index_refs=2061,
                  command="midimatch eval --lengths 10 --save-calibration cal.json")
    cal = calibrate([0.9, 0.8], np.linspace(0, 0.6, 200), model_id="a", fit=fit)
    q = cal.provenance.queries
    assert q.renderers == ("csound-fm", "timidity-freepats")  # sorted, once each
    assert (q.n_in, q.n_out, q.index_refs) == (2, 200, 2061)  # counts from what was fitted
    assert q.date_utc and q.command.startswith("midimatch eval") and cal.provenance.streams is None
    streams = Fit.now(renderers=["timidity-freepats"], n_in=516, n_out=1072, index_refs=2061,
                      command="python bench/time_to_identify.py --calibrate")
    cal = replace(cal, stream_threshold=0.8).with_fit("streams", streams)
    save_calibration(cal, path)
    back = load_calibration("a", path)
    assert back == cal and back.provenance.streams == streams
    stored = json.loads(path.read_text())["models"]["a"]["provenance"]
    assert stored["queries"]["renderers"] == ["csound-fm", "timidity-freepats"]
    said = describe(back)
    assert said["provenance"]["streams"]["n_out"] == 1072
    assert "516 in / 1072 out-of-collection streams" in said["summary"]
    assert "2 in / 200 out-of-collection queries" in said["summary"]
    assert "unknown" in said["summary"]  # the streams' conditions were not given
    assert said["evidence_params"] is None  # no evidence rule fitted
    shaped = replace(back, evidence_threshold=9.0, stream={"evidence": {"params": {"decay": 2.0}}})
    assert describe(shaped)["evidence_params"] == {"decay": 2.0}  # the shape it decides with
    with pytest.raises(ValueError, match="part"):
        cal.with_fit("samples", streams)


def test_a_file_without_provenance_loads_and_says_unknown(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": "midimatch-calibration/1", "models": {"old": {
        "threshold": 0.6, "stream_threshold": 0.8, "stable_results": 4, "n_in": 992,
        "n_out": 1100, "source": "midimatch eval: 2092 queries"}}}))
    cal = load_calibration("old", path)
    assert cal.threshold == 0.6 and cal.provenance == Provenance()
    said = describe(cal)
    assert said["provenance"] == {"queries": "unknown", "streams": "unknown"}
    assert said["summary"].count("provenance unknown") == 2
    # a calibration never fitted on streams says so, not "unknown"
    assert describe(replace(cal, stream_threshold=None))["provenance"]["streams"] == "not fitted"
    assert describe(Calibration("new"))["summary"].startswith("uncalibrated")


def test_the_shipped_calibration_says_how_it_was_made():
    from model.encoder import Encoder

    cal = load_calibration(Encoder.load().model_id)
    q, s = cal.provenance.queries, cal.provenance.streams
    # both rules are calibrated across engines (issue #17): the single-query threshold on
    # TiMidity and adplay's OPL3 (>= 600 outsider clips), the stream rules on those and, since
    # 2026-12-05, Android's EAS (>= 1,000 outsider streams); Csound and WildMIDI are left out to
    # check them on
    assert q.renderers == ("adplay-opl3", "timidity-freepats")
    assert set(q.renderers) <= set(s.renderers) and len(s.renderers) >= 2
    assert not {"csound-fm", "wildmidi-freepats"} & set(s.renderers)
    assert q.n_out >= 600 and s.n_out >= 1000
    assert (q.n_in, q.n_out, s.n_in, s.n_out) == (cal.n_in, cal.n_out, cal.stream["n_in"],
                                                  cal.stream["n_out"])
    # fitted with the cascade that prunes with the hash networks too, the queries and the
    # streams (the evidence rule's shape and threshold, fitted together) on the eval index of
    # the tenth session of 2026-12-05 (2,155 references)
    assert q.index_refs == 2155 and s.index_refs == 2155
    assert "--fit-shape" in s.command
    from index.evidence import DEFAULT_PARAMS, params_of

    assert params_of(cal) != DEFAULT_PARAMS  # the fitted shape, read by the live rule
    assert q.command.startswith("midimatch eval --renderer timidity-freepats,adplay-opl3")
    # the streams' date is taken when it is saved, after both stream rules were fitted
    assert q.date_utc == cal.created_utc and s.date_utc >= cal.stream["created_utc"]
    assert cal.evidence_threshold is not None and 0 < cal.threshold < 1
