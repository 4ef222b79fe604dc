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


def _eval_set(tmp_path, queries_dir):
    """Two indexed sine-rendered pieces and one outsider: 10 s clips, 5 queries, in
    ``queries_dir``."""
    from index.build import BuildOptions, build_index
    from index.evaluation.evalset import Plan, QuerySetConfig, make_queries
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
    make_queries(plan, queries_dir, QuerySetConfig(
        lengths_s=(10.0,), conditions=("clean", "room_noise"), out_conditions=("clean",),
        renderer="sine"), workers=0, progress=False)


def test_eval_prints_its_answers_and_saves_a_calibration_that_says_what_it_was_fitted_on(
        tmp_path, capsys):
    from index.calibration import load_calibration
    from model.encoder import Encoder

    _eval_set(tmp_path, tmp_path / "queries")
    cal_path = tmp_path / "cal.json"
    assert main(["eval", "--out", str(tmp_path), "--index", str(tmp_path / "index"),
                 "--queries", str(tmp_path / "queries"), "--no-progress",
                 "--save-calibration", str(cal_path), "--allow-small-calibration"]) == 0
    cap = capsys.readouterr()
    out = cap.out
    # one outsider bounds no false rate: saved because it was asked for, and said so
    assert "warning: --allow-small-calibration: 1 out-of-collection queries cannot bound a 1 % " \
        "false rate: 100 needed" in cap.err
    line = next(x for x in out.splitlines() if x.startswith("answers ("))
    assert line.startswith("answers (5 queries): ") and "identified, " in line
    assert line.endswith(" not in the collection")  # the words identify and stream use
    fit = load_calibration(Encoder.load().model_id, cal_path).provenance.queries
    assert fit.renderers == ("sine",) and fit.conditions == ("clean", "room_noise")
    assert (fit.n_in, fit.n_out, fit.index_refs) == (4, 1, 2)
    assert fit.command.startswith("midimatch ") and fit.date_utc
    source = load_calibration(Encoder.load().model_id, cal_path).source
    assert source.endswith("(too few outsiders: 1 of the 100 that bound the false rate)")


def test_eval_pools_the_query_sets_of_several_renderers_and_calibrates_on_all(tmp_path, capsys):
    """`--renderer a,b`: both sets searched in one run, a table each and the pooled one, and
    the calibration fitted on both (issue #17: a confidence calibrated across engines)."""
    import json
    import shutil

    from index.calibration import load_calibration
    from model.encoder import Encoder

    _eval_set(tmp_path, tmp_path / "queries-sine")
    # a second renderer's set: the same clips under another renderer's name
    shutil.copytree(tmp_path / "queries-sine", tmp_path / "queries-sine-b")
    manifest = tmp_path / "queries-sine-b" / "queries.json"
    m = json.loads(manifest.read_text())
    m["config"]["renderer"] = "sine-b"
    manifest.write_text(json.dumps(m))
    cal_path, report = tmp_path / "cal.json", tmp_path / "report.json"
    assert main(["eval", "--out", str(tmp_path), "--index", str(tmp_path / "index"),
                 "--renderer", "sine,sine-b", "--no-progress", "--json", str(report),
                 "--save-calibration", str(cal_path), "--allow-small-calibration"]) == 0
    out = capsys.readouterr().out
    assert "sine (5 queries):" in out and "sine-b (5 queries):" in out
    assert "pooled, sine + sine-b (10 queries):" in out
    assert "answers (10 queries): " in out
    rep = json.loads(report.read_text())
    assert rep["n_queries"] == 10 and set(rep["summary_by_renderer"]) == {"sine", "sine-b"}
    # the same clips under two names: the same figures in both tables (times apart)
    a, b = (rep["summary_by_renderer"][x] for x in ("sine", "sine-b"))
    assert set(a) == set(b) == {"all/10", "clean/10", "room_noise/10"}
    for cell in a:
        same = {k for k in a[cell] if not k.endswith(("_s", "_ms")) and "time" not in k}
        assert {k: a[cell][k] for k in same} == {k: b[cell][k] for k in same}
        assert a[cell]["n_in"] > 0
    fit = load_calibration(Encoder.load().model_id, cal_path).provenance.queries
    assert fit.renderers == ("sine", "sine-b") and (fit.n_in, fit.n_out) == (8, 2)


def test_eval_says_which_query_set_is_missing(tmp_path, capsys):
    _eval_set(tmp_path, tmp_path / "queries-sine")
    assert main(["eval", "--out", str(tmp_path), "--renderer", "sine,adplay-opl3",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no query set at" in err[0] and "queries-adplay-opl3" in err[0]


def test_save_calibration_refuses_too_few_outsiders_and_none_before_the_run(tmp_path, capsys,
                                                                            monkeypatch):
    """One outsider gave a threshold of 5e-324 (every query identified), saved; a set without
    outsiders ran to the end, then raised a traceback. Both are refused before the search."""
    from index.search import Cascade

    _eval_set(tmp_path, tmp_path / "queries")
    opened = []
    monkeypatch.setattr(Cascade, "open", classmethod(lambda cls, *a, **k: opened.append(a)))
    cal_path = tmp_path / "cal.json"
    argv = ["eval", "--out", str(tmp_path), "--index", str(tmp_path / "index"), "--queries",
            str(tmp_path / "queries"), "--no-progress", "--save-calibration", str(cal_path)]
    for extra, said in (
            ((), "--save-calibration: 1 out-of-collection queries cannot bound a 1 % false rate: "
                 "100 needed"),
            (("--conditions", "room_noise"), "--save-calibration: none of the 2 queries is out "
             "of the collection"),
            (("--conditions", "room_noise", "--allow-small-calibration"), "none of the 2"),
    ):
        assert main(argv + list(extra)) == 2, extra
        cap = capsys.readouterr()
        assert len(cap.err.splitlines()) == 1 and said in cap.err, (extra, cap.err)
        assert "--allow-small-calibration" in cap.err or "none" in said
        assert cap.out == "" and not opened and not cal_path.exists()
    # nowhere to write it: said before the run too
    argv[-1] = str(tmp_path / "no-such-folder" / "cal.json")
    assert main(argv + ["--allow-small-calibration"]) == 2
    assert "no folder" in capsys.readouterr().err and not opened


@pytest.mark.parametrize("extra,said", [
    (("--top-k", "0"), "--top-k must be >= 1"),
    (("--prune-parts", "-1"), "--prune-parts must be >= 0"),
    (("--lengths", "abc"), "'abc' is not a clip length"),
    (("--lengths", "10,-5"), "'-5' is not a clip length"),
    (("--batch", "0"), "--batch must be >= 1"),
    (("--batch", "-1"), "--batch must be >= 1"),
    (("--threads", "-2"), "--threads must be >= 1"),
    (("--baseline", "1", "--baseline-cells", "clean"), "'clean' is not CONDITION/LENGTH"),
    (("--baseline", "-1"), "--baseline must be >= 0"),
    (("--max-pieces", "-1"), "--max-pieces must be >= 1"),
    (("--allow-small-calibration",), "goes with --save-calibration"),
])
def test_eval_refuses_bad_options_in_one_line_before_loading_anything(tmp_path, capsys, extra,
                                                                       said):
    """Each was a traceback (ValueError, IndexError), a silent no-op (--batch -1, --max-pieces -1:
    no query kept, blamed on --lengths/--conditions) or ran the whole evaluation first."""
    # no index, no query set here: an error about either would mean they were looked for
    assert main(["eval", "--out", str(tmp_path), "--no-progress", *extra]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.splitlines()) == 1 and said in cap.err, cap.err


def test_prepare_builds_the_index_named_with_the_weights_given(tmp_path, monkeypatch):
    """After a new model is shipped, OUT/index holds the old one's encodings: prepare for a new
    query set must build the --index it is given with the --weights it is given (it ignored
    both and refused, 2026-12-05)."""
    import pretty_midi

    import index.evaluation.evalset as evalset
    from index.store import load_index
    from model.encoder import Encoder

    midi = tmp_path / "a.mid"
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    inst.notes = [pretty_midi.Note(90, 60 + k % 12, 0.25 * k, 0.25 * k + 0.2) for k in range(80)]
    pm.instruments.append(inst)
    pm.write(str(midi))
    monkeypatch.setattr(evalset, "plan_collection",
                        lambda *a, **kw: evalset.Plan(index_files=[str(midi)]))
    rendered = []
    monkeypatch.setattr(evalset, "make_queries",
                        lambda plan, out, cfg, **kw: rendered.append(cfg.renderer)
                        or {"queries": [], "skipped": []})
    weights = tmp_path / "other.pt"
    other = Encoder.untrained()
    other.save(weights, model_id="32bit-other-model")
    out, idx = tmp_path / "eval", tmp_path / "idx-other"
    assert main(["eval", "prepare", "--out", str(out), "--corpus", str(tmp_path),
                 "--renderers", "sine", "--index", str(idx), "--weights", str(weights),
                 "--workers", "1", "--no-progress"]) == 0
    assert rendered == ["sine"] and not (out / "index").exists()
    assert load_index(idx).model_id == "32bit-other-model"
