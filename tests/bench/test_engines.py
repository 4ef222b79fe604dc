"""bench/engines.py: which query sets it finds, and one row per renderer from a summary."""

from __future__ import annotations

from bench.engines import engine_row, query_sets, source_rows
from model.training.render import HELD_OUT, TRAIN_RENDERERS


def test_query_sets_are_found_per_renderer(tmp_path):
    for d in ("queries", "queries-adplay-opl3", "queries-broken"):
        (tmp_path / d).mkdir()
    (tmp_path / "queries" / "queries.json").write_text("{}")
    (tmp_path / "queries-adplay-opl3" / "queries.json").write_text("{}")
    # queries-broken has no queries.json: an interrupted prepare is not a query set
    assert query_sets(tmp_path) == {HELD_OUT: tmp_path / "queries",
                                    "adplay-opl3": tmp_path / "queries-adplay-opl3"}


def test_a_row_reads_the_cells_and_names_the_role():
    summary = {"clean/5": {"top1": 0.8, "n_in": 10, "n_out": 5},
               "clean/10": {"top1": 0.9, "n_in": 10, "n_out": 5,
                            "position_within_1s_or_repeat": 0.875},
               "room_noise/10": {"top1": 0.5},
               "all/10": {"prune_recall@100": 0.95, "false_confident": 0.02}}
    row = engine_row(HELD_OUT, summary)
    assert row["role"] == "held-out" and (row["n_in"], row["n_out"]) == (10, 5)
    assert (row["top1 clean 5s"], row["top1 clean 10s"], row["top1 room_noise 10s"]) == \
        (80.0, 90.0, 50.0)
    assert row["top1 clean 20s"] == "-"  # not measured is not zero
    assert (row["prune@100 10s"], row["passage 10s"], row["false id 10s"]) == (95.0, 87.5, 2.0)
    assert engine_row(TRAIN_RENDERERS[0], summary)["role"] == "train"


def test_one_query_set_of_several_sources_gives_a_row_per_source():
    cells = {"clean/10": {"top1": 1.0, "n_in": 5, "n_out": 0}}
    by_source = {f"{s}:{g}": c for s in ("mscore3", "openmsx/adplay-opl3", "solfege")
                 for g, c in cells.items()}
    rows = {r["renderer"]: r for r in source_rows(by_source)}
    assert list(rows) == ["mscore3", "openmsx/adplay-opl3", "solfege"]
    assert (rows["openmsx/adplay-opl3"]["family"], rows["openmsx/adplay-opl3"]["role"]) == \
        ("fm", "held-out")
    assert (rows["mscore3"]["family"], rows["mscore3"]["role"]) == ("sampled-gm", "pair")
    assert rows["mscore3"]["top1 clean 10s"] == 100.0 and rows["solfege"]["n_in"] == 5
