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


def test_eval_prints_its_answers_and_saves_a_calibration_that_says_what_it_was_fitted_on(
        tmp_path, capsys):
    from index.build import BuildOptions, build_index
    from index.calibration import load_calibration
    from index.evaluation.evalset import Plan, QuerySetConfig, make_queries
    from model.encoder import Encoder
    from tests.conftest import make_piece

    files = []
    for seed in range(3):
        files.append(tmp_path / "midi" / f"p{seed}.mid")
        files[-1].parent.mkdir(exist_ok=True)
        make_piece(seed + 40, duration_s=30.0, drums=False).write(str(files[-1]))
    build_index(tmp_path / "index", files[:2], BuildOptions(workers=1, progress=False))
    piece = {"source": "generated", "split": "unseen"}
    plan = Plan(index_files=[str(f) for f in files[:2]],
                in_pieces=[{"path": str(f), **piece} for f in files[:2]],
                out_pieces=[{"path": str(files[2]), **piece}])
    make_queries(plan, tmp_path / "queries", QuerySetConfig(
        lengths_s=(10.0,), conditions=("clean", "room_noise"), out_conditions=("clean",),
        renderer="sine"), workers=0, progress=False)
    cal_path = tmp_path / "cal.json"
    assert main(["eval", "--out", str(tmp_path), "--index", str(tmp_path / "index"),
                 "--queries", str(tmp_path / "queries"), "--no-progress",
                 "--save-calibration", str(cal_path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("answers ("))
    assert line.startswith("answers (5 queries): ") and "identified, " in line
    assert line.endswith(" not in the collection")  # the words identify and stream use
    fit = load_calibration(Encoder.load().model_id, cal_path).provenance.queries
    assert fit.renderers == ("sine",) and fit.conditions == ("clean", "room_noise")
    assert (fit.n_in, fit.n_out, fit.index_refs) == (4, 1, 2)
    assert fit.command.startswith("midimatch ") and fit.date_utc
