from __future__ import annotations

import json

import numpy as np
import pytest

from index import store
from model.errors import IndexFormatError, ModelMismatchError

META = {"model_id": "m1", "n_bits": 32, "embed_dim": 4, "render_method": "fast"}


def _parts(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(n):
        h = rng.integers(0, 2**32, size=int(rng.integers(1, 30)), dtype=np.uint64)
        w = int(rng.integers(1, 5))
        parts.append(({"path": f"/x/{k}.mid", "title": f"t{k}", "duration_s": 1.0},
                      h.astype(np.uint32), rng.standard_normal((w, 4)).astype(np.float16),
                      np.arange(w, dtype=np.int32) * 108))
    return parts


def test_round_trip_is_memory_mapped_and_exact(tmp_path):
    parts = _parts(7)
    data = store.concat(META, parts, np.dtype(np.uint32))
    store.write_index(tmp_path / "idx", data, {"encoded": 7})
    back = store.load_index(tmp_path / "idx")
    assert len(back) == 7
    assert isinstance(back.hashes, np.memmap)
    assert back.meta["version"] == store.VERSION and back.meta["n_refs"] == 7
    assert back.report == {"encoded": 7}
    for (ref, h, e, s), (ref2, h2, e2, s2) in zip(parts, store.iter_parts(back), strict=True):
        assert ref == ref2
        np.testing.assert_array_equal(h, h2)
        np.testing.assert_array_equal(e, e2)
        np.testing.assert_array_equal(s, s2)
        assert h2.dtype == np.uint32
    assert back.nbytes() == data.nbytes()


def test_new_generation_replaces_old_and_cleans_up(tmp_path):
    root = tmp_path / "idx"
    store.write_index(root, store.concat(META, _parts(2), np.dtype(np.uint32)))
    store.write_index(root, store.concat(META, _parts(5), np.dtype(np.uint32)))
    gens = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert gens == ["gen-000002"]
    assert (root / "CURRENT").read_text().strip() == "gen-000002"
    assert len(store.load_index(root)) == 5


def test_two_writers_of_one_index_take_turns(tmp_path, monkeypatch):
    # Two builds of one folder numbered their generations alike and one's clean-up deleted the
    # other's live generation (CURRENT named a folder that was gone). Writers now take turns.
    import threading

    root = tmp_path / "idx"
    store.write_index(root, store.concat(META, _parts(1), np.dtype(np.uint32)))
    real = store._write_generation
    inside, go = threading.Event(), threading.Event()

    def slow_first(path, data, report):
        if not inside.is_set():
            inside.set()
            assert go.wait(30)
        real(path, data, report)

    monkeypatch.setattr(store, "_write_generation", slow_first)
    a = threading.Thread(target=store.write_index,
                         args=(root, store.concat(META, _parts(2), np.dtype(np.uint32))))
    b = threading.Thread(target=store.write_index,
                         args=(root, store.concat(META, _parts(3), np.dtype(np.uint32))))
    a.start()
    assert inside.wait(30)  # A is writing its generation
    b.start()
    b.join(0.5)
    assert b.is_alive()  # B waits for A instead of writing the same generation beside it
    go.set()
    a.join(30)
    b.join(30)
    assert not a.is_alive() and not b.is_alive()
    assert len(store.load_index(root)) == 3  # B committed last, and its generation is there
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["gen-000003"]


def test_crash_before_commit_leaves_previous_generation_loadable(tmp_path, monkeypatch):
    root = tmp_path / "idx"
    store.write_index(root, store.concat(META, _parts(3), np.dtype(np.uint32)))

    def boom(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(store.os, "replace", boom)
    with pytest.raises(OSError, match="power cut"):
        store.write_index(root, store.concat(META, _parts(9), np.dtype(np.uint32)))
    monkeypatch.undo()
    assert len(store.load_index(root)) == 3  # the half-written generation is not live
    store.write_index(root, store.concat(META, _parts(4), np.dtype(np.uint32)))
    assert len(store.load_index(root)) == 4
    # the failed generation was removed (index/store.py), so its number is used again
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["gen-000002"]


def test_missing_and_foreign_folders_are_clear_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="no CURRENT"):
        store.load_index(tmp_path / "nowhere")
    root = tmp_path / "idx"
    gen = store.write_index(root, store.concat(META, _parts(2), np.dtype(np.uint32)))
    meta = json.loads((gen / "meta.json").read_text())
    (gen / "meta.json").write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(IndexFormatError, match="version 99"):
        store.load_index(root)
    (gen / "meta.json").write_text(json.dumps(meta | {"n_refs": 3}))
    with pytest.raises(IndexFormatError, match="inconsistent"):
        store.load_index(root)
    (gen / "meta.json").write_text(json.dumps(meta))
    (gen / "hashes.npy").write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match="damaged"):
        store.load_index(root)


def test_model_mismatch_is_an_error(tmp_path):
    store.write_index(tmp_path / "i", store.concat(META, _parts(1), np.dtype(np.uint32)))
    store.load_index(tmp_path / "i", expected_model_id="m1")
    with pytest.raises(ModelMismatchError, match="m1"):
        store.load_index(tmp_path / "i", expected_model_id="other-model")


def test_empty_index_round_trips(tmp_path):
    data = store.empty_index(META, np.dtype(np.uint16))
    store.write_index(tmp_path / "e", data)
    back = store.load_index(tmp_path / "e")
    assert len(back) == 0 and back.hashes.dtype == np.uint16
    assert back.embeddings.shape == (0, 4)


@pytest.mark.parametrize("damage", [b"{garb", b"[1]", b"\xff\xfe not utf-8", "folder"])
def test_a_damaged_build_report_is_ignored_with_a_warning(tmp_path, damage, caplog):
    # It only says what the build did: a corrupt one crashed every command opening the index.
    from server.cli import main

    root = tmp_path / "idx"
    gen = store.write_index(root, store.concat(META, _parts(2), np.dtype(np.uint32)),
                            {"encoded": 2})
    report = gen / "build_report.json"
    report.unlink()
    if damage == "folder":
        report.mkdir()  # unreadable: IsADirectoryError
    else:
        report.write_bytes(damage)
    back = store.load_index(root)
    assert len(back) == 2 and back.report == {}
    assert "build_report.json: ignored" in caplog.text
    assert main(["index", "info", str(root), "--json"]) == 0


def _save(name, fn):
    def damage(gen):
        np.save(gen / f"{name}.npy", fn(np.load(gen / f"{name}.npy")))
    return damage


def _edit_json(name, fn):
    def damage(gen):
        (gen / name).write_text(json.dumps(fn(json.loads((gen / name).read_text()))))
    return damage


def _edit_refs(fn):
    def damage(gen):
        refs = [json.loads(line) for line in (gen / "refs.jsonl").read_text().splitlines()]
        refs[1] = fn(refs[1])
        (gen / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    return damage


def _set(a, i, v):
    a[i] = v
    return a


@pytest.mark.parametrize("damage", [
    _save("hashes", lambda a: a.astype(np.float64)),
    _save("hashes", lambda a: a.astype(np.uint16)),  # meta says uint32 below
    _save("hash_offsets", lambda a: _set(a, 2, 10**9)),
    _save("hash_offsets", lambda a: _set(a, 0, 1)),
    _save("hash_offsets", lambda a: a.astype(np.float64)),
    _save("embed_ref", lambda a: _set(a, 0, 999)),
    _save("embed_ref", lambda a: _set(a, 0, -1)),
    _save("embed_ref", lambda a: a.astype(np.float32)),
    _save("embeddings", lambda a: a.astype(np.float32)),
    _edit_json("meta.json", lambda m: [m]),
    _edit_json("meta.json", lambda m: {k: v for k, v in m.items() if k != "n_bits"}),
    _edit_json("meta.json", lambda m: m | {"window": [540, 108]}),
    _edit_refs(lambda r: [1, 2]),
    _edit_refs(lambda r: {k: v for k, v in r.items() if k != "duration_s"}),
    _edit_refs(lambda r: r | {"duration_s": "long"}),
], ids=["hashes_float", "hashes_uint16", "offsets_jump", "offsets_not_from_0",
        "offsets_float", "embed_ref_past_end", "embed_ref_negative", "embed_ref_float",
        "embeddings_float32", "meta_list", "meta_no_n_bits", "meta_window_list",
        "ref_not_object", "ref_no_duration", "ref_duration_text"])
def test_damage_the_shape_checks_missed_is_a_clean_error(tmp_path, damage, capsys):
    # Each of these loaded as valid, then failed with a traceback in `index info` or a search.
    from server.cli import main

    root = tmp_path / "idx"
    meta = META | {"hash_dtype": "uint32"}
    gen = store.write_index(root, store.concat(meta, _parts(4), np.dtype(np.uint32)))
    store.load_index(root)
    damage(gen)
    with pytest.raises(IndexFormatError):
        store.load_index(root)
    assert main(["index", "info", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("midimatch: error: ") and len(err.splitlines()) == 1
