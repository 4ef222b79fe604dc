"""``midimatch eval``'s per-renderer query sets: where they live, what prepare refuses."""

from __future__ import annotations

import pytest

from index.evaluation.cli import queries_dir
from server.cli import main


def test_each_renderer_has_its_own_query_set_and_the_held_out_one_keeps_its_folder(tmp_path):
    assert queries_dir(tmp_path, None) == tmp_path / "queries"
    assert queries_dir(tmp_path, "timidity-freepats") == tmp_path / "queries"
    assert queries_dir(tmp_path, "adplay-opl3") == tmp_path / "queries-adplay-opl3"


def test_prepare_refuses_an_unknown_renderer_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "prepare", "--out", str(tmp_path / "eval"), "--corpus", str(tmp_path),
              "--renderers", "timidity-freepats,no-such-synth"])
    assert "unknown renderers ['no-such-synth']" in str(e.value)


def test_data_renderers_lists_every_renderer_with_its_role(capsys):
    from model.training.render import HELD_OUT, RENDERERS, TRAIN_RENDERERS

    assert main(["data", "renderers", "--json"]) == 0
    import json

    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == set(RENDERERS)
    assert rows[HELD_OUT]["role"] == "held-out" and rows["sine"]["installed"] is True
    assert all(rows[n]["role"] == "train" for n in TRAIN_RENDERERS)


def test_train_prepare_refuses_a_held_out_renderer(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "prepare", "--corpus", str(tmp_path), "--out", str(tmp_path / "p"),
              "--renderers", "fluid-fluidr3,adplay-opl3"])
    assert "['adplay-opl3'] are held out of training" in str(e.value)


def test_data_renderers_text_names_role_and_family(capsys):
    assert main(["data", "renderers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sine = next(line for line in lines if line.startswith("sine "))
    assert sine.split()[1:4] == ["yes", "other", "synthesis"]
