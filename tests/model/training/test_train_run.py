"""``midimatch train run``: the deadline split, the load sampler and the errors before training."""

from __future__ import annotations

import time

import pytest

from model.errors import MidimatchError
from model.training.train_run import MIN_FIT_MINUTES, LoadSampler, fit_budget, train_run


def test_fit_budget_splits_what_is_left_after_the_reserve():
    hash_min, embed_min = fit_budget(41.5 * 60, 0.45, 1.5)
    assert hash_min == pytest.approx(18.0) and embed_min == pytest.approx(22.0)


def test_fit_budget_refuses_a_deadline_too_close_to_train():
    with pytest.raises(MidimatchError) as e:
        fit_budget((MIN_FIT_MINUTES + 1.0) * 60, 0.5, 1.5)
    assert e.value.reason == "budget" and "run again" in str(e.value)
    with pytest.raises(MidimatchError, match="hash_share"):
        fit_budget(3600, 1.0, 1.5)


def test_load_sampler_records_samples_and_summarises():
    with LoadSampler(every_s=0.01) as load:
        time.sleep(0.1)
    s = load.summary()
    assert s["samples"] >= 2 and s["min"] <= s["median"] <= s["max"]
    assert LoadSampler().summary() == {"samples": 0, "min": None, "median": None, "max": None}


def test_missing_soundfonts_fail_before_any_data_step(tmp_path, monkeypatch):
    from model.training import data

    monkeypatch.setattr(data, "available", lambda name: name == "fluid-fluidr3")
    said = []
    with pytest.raises(MidimatchError) as e:
        train_run(tmp_path / "corpus", tmp_path / "pairs", tmp_path / "m.pt", tmp_path / "m.ckpt",
                  say=said.append)
    assert e.value.reason == "too_few_renderers" and said == []
    assert not (tmp_path / "corpus").exists()


def test_generated_songs_of_evaluation_fail_before_any_data_step(tmp_path, monkeypatch):
    from model.training import data

    monkeypatch.setattr(data, "available", lambda name: True)
    said = []
    with pytest.raises(MidimatchError) as e:
        train_run(tmp_path / "corpus", tmp_path / "pairs", tmp_path / "m.pt", tmp_path / "m.ckpt",
                  generated=251, say=said.append)
    assert e.value.reason == "bad_range" and said == []
    assert not (tmp_path / "corpus").exists()


def test_no_midi_after_the_data_steps_is_a_clear_error(tmp_path, monkeypatch):
    from model.training import data

    # every training renderer "installed", so the answer does not depend on this machine's
    monkeypatch.setattr(data, "available", lambda name: True)
    said = []
    with pytest.raises(MidimatchError) as e:
        train_run(tmp_path / "corpus", tmp_path / "pairs", tmp_path / "m.pt", tmp_path / "m.ckpt",
                  works=0, generated=0, say=said.append)
    assert e.value.reason == "no_data"
    assert said[0].endswith("corpus ...") and said[1].endswith("generate ...")
    assert not (tmp_path / "m.pt").exists()
