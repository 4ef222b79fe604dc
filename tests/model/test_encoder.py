from __future__ import annotations

import numpy as np
import pytest
import torch

from model.encoder import Encoder, WindowSpec
from model.errors import MidimatchError
from model.nets import EmbedNet, HashNet, NetConfig


def _frames(n: int, seed: int = 0) -> np.ndarray:
    f = np.random.default_rng(seed).random((n, 48)).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_nets_shapes_follow_the_seed_architecture():
    cfg = NetConfig(n_bits=16)
    x = torch.from_numpy(_frames(100))[None]
    assert HashNet(cfg)(x).shape == (1, 25, 16)  # two 2×2 pools: one hash per 4 frames
    out = EmbedNet(cfg)(x)
    assert out.shape == (1, 128) and out.abs().max() <= 1


def test_untrained_model_is_deterministic_and_seed_dependent():
    a, b, c = Encoder.untrained(0), Encoder.untrained(0), Encoder.untrained(1)
    f = _frames(400)
    assert a.model_id == b.model_id != c.model_id
    np.testing.assert_array_equal(a.hashes(f, "midi"), b.hashes(f, "midi"))
    assert not np.array_equal(a.hashes(f, "midi"), c.hashes(f, "midi"))


@pytest.mark.parametrize("bits,dtype", [(16, np.uint16), (32, np.uint32)])
def test_hashes_pack_bit_i_from_unit_i(bits, dtype):
    enc = Encoder.untrained(0, NetConfig(n_bits=bits))
    f = _frames(200)
    h = enc.hashes(f, "audio")
    act = enc.hash_activations(f, "audio")
    assert h.dtype == dtype and h.shape == (50,)
    for i in range(bits):
        np.testing.assert_array_equal((h >> i) & 1, act[:, i] > 0)
    assert enc.hashes(_frames(3), "audio").shape == (0,)


def test_save_load_round_trip_keeps_outputs_and_id(tmp_path):
    enc = Encoder.untrained(3)
    mid = enc.save(tmp_path / "m.pt")
    back = Encoder.load(tmp_path / "m.pt")
    assert back.model_id == mid
    f = _frames(300)
    np.testing.assert_array_equal(enc.hashes(f, "midi"), back.hashes(f, "midi"))
    np.testing.assert_allclose(enc.embed(f, "audio"), back.embed(f, "audio"), atol=1e-6)


def test_bad_weights_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(MidimatchError, match="cannot load"):
        Encoder.load(tmp_path / "bad.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(MidimatchError, match="not a midimatch-model"):
        Encoder.load(tmp_path / "other.pt")


def test_any_file_that_is_not_a_model_is_a_bad_model_error(tmp_path):
    """An audio file given as --weights made torch's unpickler raise IndexError (pop from empty
    list), which passed through Encoder.load; a damaged model file raised KeyError."""
    import soundfile as sf

    sf.write(tmp_path / "take.wav", np.zeros((4410, 1), np.float32), 44100)
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 40)
    enc = Encoder.untrained(0)
    enc.save(tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    del blob["state"]["hash_audio"]
    torch.save(blob, tmp_path / "damaged.pt")
    for name in ("take.wav", "junk.pt", "damaged.pt"):
        with pytest.raises(MidimatchError) as e:
            Encoder.load(tmp_path / name)
        assert e.value.reason == "bad_model" and name in str(e.value), name
        assert "\n" not in str(e.value), name


def test_a_device_this_machine_lacks_is_a_bad_device_error():
    from model.encoder import check_device

    assert check_device("cpu") == torch.device("cpu")
    for device, said in (("bogus", "unknown torch device 'bogus'"), ("cuda:99", "cuda:99"),
                         ("meta", "meta")):
        with pytest.raises(MidimatchError, match=said) as e:
            check_device(device)
        assert e.value.reason == "bad_device" and "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(MidimatchError, match="no CUDA device is available"):
            Encoder.load(device="cuda")
    with pytest.raises(MidimatchError, match="bogus"):
        Encoder.untrained(0, device="bogus")


def test_missing_weights_are_an_error_naming_the_file_not_an_untrained_model(tmp_path,
                                                                           monkeypatch):
    import model.encoder as E

    with pytest.raises(MidimatchError) as e:
        Encoder.load(tmp_path / "nope.pt")
    assert e.value.reason == "no_model" and "nope.pt" in str(e.value)
    monkeypatch.setattr(E, "DEFAULT_WEIGHTS", tmp_path / "default.pt")  # a checkout without it
    with pytest.raises(MidimatchError) as e:
        Encoder.load()
    assert e.value.reason == "no_model" and "default.pt" in str(e.value)
    assert "make train" in str(e.value)


def test_window_embeddings_cover_the_piece_and_match_direct_embedding():
    enc = Encoder.untrained(0)
    spec = WindowSpec()
    f = _frames(1000)
    emb, starts = enc.window_embeddings(f, "midi")
    np.testing.assert_array_equal(starts, spec.starts(1000))
    assert starts[0] == 0 and starts[-1] + spec.length == 1000
    assert np.all(np.diff(starts) <= spec.hop)
    assert emb.shape == (len(starts), 128)
    short = f[:150]  # shorter than a window: one window, equal to the whole-excerpt embedding
    emb1, st1 = enc.window_embeddings(short, "midi")
    assert st1.tolist() == [0]
    np.testing.assert_allclose(emb1[0], enc.embed(short, "midi"), atol=1e-5)


def test_embed_views_are_the_whole_excerpt_then_its_parts():
    enc = Encoder.untrained(0)
    f = _frames(200)  # 100 trunk steps: halves are steps 0-49 and 50-99, frames 0-99 and 100-199
    views = enc.embed_views(f, "audio", 2)
    assert views.shape == (3, 128) and views.dtype == np.float32
    np.testing.assert_allclose(views[0], enc.embed(f, "audio"), atol=1e-5)
    # the index's window embeddings pool the same trunk over the same slices
    enc.window = WindowSpec(length=100, hop=100)
    halves, starts = enc.window_embeddings(f, "audio")
    assert starts.tolist() == [0, 100]
    np.testing.assert_allclose(views[1:], halves, atol=1e-5)
    assert not np.allclose(views[1], views[2], atol=1e-3)
    np.testing.assert_allclose(enc.embed_views(f, "audio", 0), views[:1], atol=1e-6)
    # 3 frames = one trunk step: the empty first half is the whole excerpt
    tiny = enc.embed_views(f[:3], "audio", 2)
    np.testing.assert_allclose(tiny, np.repeat(tiny[:1], 3, axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="parts"):
        enc.embed_views(f, "audio", -1)


def test_input_validation():
    enc = Encoder.untrained(0)
    with pytest.raises(ValueError, match="shape"):
        enc.hashes(np.zeros((10, 12), np.float32), "midi")
    with pytest.raises(ValueError, match="modality"):
        enc.hashes(_frames(10), "video")
    with pytest.raises(ValueError, match="at least 2"):
        enc.embed(_frames(1), "audio")
