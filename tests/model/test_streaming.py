"""Tests of model.streaming: receptive fields, the hasher and the embedder against the whole pass.

The attention window alone is tested in test_attention.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.encoder import Encoder, WindowSpec
from model.frametail import StreamError
from model.streaming import (
    HASH_LOOKAHEAD_MS,
    StreamingEmbedder,
    StreamingHasher,
    embed_step,
    embeddings,
    hash_step,
)


@pytest.fixture(scope="module")
def shipped() -> Encoder:
    return Encoder.load()


@pytest.fixture(scope="module")
def untrained() -> Encoder:
    return Encoder.untrained(0)


def _frames(n: int, seed: int = 0) -> np.ndarray:
    f = np.random.default_rng(seed).random((n, 48)).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _chunks(n: int, pattern: str, seed: int = 0) -> list[int]:
    if pattern == "ones":
        return [1] * n
    if pattern == "all":
        return [n]
    rng = np.random.default_rng(seed)
    sizes: list[int] = [0]
    while sum(sizes) < n:
        sizes.append(int(rng.integers(0, 13)))  # zero-sized pushes included
    sizes[-1] -= sum(sizes) - n
    return sizes


def _stream_hashes(enc: Encoder, f: np.ndarray, sizes: list[int], packed: bool) -> np.ndarray:
    h = StreamingHasher(enc)
    out, i = [], 0
    for c in sizes:
        out.append(h.push(f[i:i + c], packed=packed))
        i += c
    out.append(h.finish(packed=packed))
    return np.concatenate(out)


def _changed(out_a: torch.Tensor, out_b: torch.Tensor) -> set[int]:
    diff = (out_a - out_b).abs().reshape(out_a.shape[0], -1).amax(1)
    return set(np.nonzero(diff.numpy() > 0)[0].tolist())


# ---------------------------------------------------------------------------- receptive fields
def test_hash_frame_k_depends_on_frames_4k_minus_4_to_4k_plus_7(shipped):
    net = shipped.nets["hash_audio"]
    f = torch.from_numpy(_frames(96))[None]
    with torch.inference_mode():
        base = net(f)[0]
        offsets = set()
        for t in range(40, 56):
            g = f.clone()
            g[0, t] += 3.0
            for k in _changed(net(g)[0], base):
                offsets.add(t - 4 * k)
    assert offsets <= set(range(-4, 8))
    assert {-4, 7} <= offsets  # the bounds are reached: the look-ahead is not over-stated


def test_embed_trunk_step_j_depends_on_frames_2j_minus_2_to_2j_plus_3(shipped):
    net = shipped.nets["embed_audio"]
    f = torch.from_numpy(_frames(64))[None]
    with torch.inference_mode():
        base = net.front(f)[0]
        offsets = set()
        for t in range(20, 30):
            g = f.clone()
            g[0, t] += 3.0
            for j in _changed(net.front(g)[0], base):
                offsets.add(t - 2 * j)
    assert offsets == set(range(-2, 4))


# ---------------------------------------------------------------------------------- hasher
@pytest.mark.parametrize("pattern", ["ones", "random", "all"])
@pytest.mark.parametrize("n", [123, 122, 160, 9, 5, 3, 0])  # every T mod 4, tiny streams
def test_streaming_hashes_equal_the_whole_pass_for_any_chunking(shipped, n, pattern):
    f = _frames(n, seed=n)
    sizes = _chunks(n, pattern, seed=n)
    got = _stream_hashes(shipped, f, sizes, packed=True)
    want = shipped.hashes(f, "audio")
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    act = _stream_hashes(shipped, f, sizes, packed=False)
    np.testing.assert_allclose(act, shipped.hash_activations(f, "audio"), atol=1e-5)


def test_hash_k_is_emitted_when_frame_4k_plus_7_arrives(untrained):
    h = StreamingHasher(untrained)
    f = _frames(60)
    for n in range(1, 61):
        h.push(f[n - 1:n])
        assert h.n_hashes == max(0, (n - 4) // 4)
        assert h.nbytes <= 11 * 48 * 4
    assert h.lookahead_frames == 4
    assert HASH_LOOKAHEAD_MS == pytest.approx(4 * 1024 / 22.05 + 132.5, abs=0.1)


def test_hash_step_batches_many_streams_like_each_alone(untrained):
    rng = np.random.default_rng(3)
    lengths = [250, 97, 4, 0, 180]
    modalities = ["audio", "midi", "audio", "audio", "midi"]
    frames = [_frames(n, seed=i) for i, n in enumerate(lengths)]
    hashers = [StreamingHasher(untrained, m) for m in modalities]
    got: list[list[np.ndarray]] = [[] for _ in lengths]
    pos = [0] * len(lengths)
    while any(p < n for p, n in zip(pos, lengths, strict=True)):
        new = []
        for i, n in enumerate(lengths):
            c = int(rng.integers(0, 9))
            new.append(frames[i][pos[i]:pos[i] + c])
            pos[i] = min(n, pos[i] + c)
        for i, out in enumerate(hash_step(untrained, hashers, new)):
            got[i].append(out)
    for i, h in enumerate(hashers):
        got[i].append(h.finish())
        want = untrained.hashes(frames[i], modalities[i])
        np.testing.assert_array_equal(np.concatenate(got[i]), want)


def test_a_bad_stream_in_a_tick_changes_no_stream(untrained):
    f = _frames(40)
    good, other = StreamingHasher(untrained), StreamingHasher(untrained)
    bad = f[:8].copy()
    bad[3, 0] = np.inf
    with pytest.raises(StreamError, match="stream 1: .*NaN or infinity"):
        hash_step(untrained, [good, other], [f[:8], bad])
    assert good.n_frames == other.n_frames == 0
    out = np.concatenate([*hash_step(untrained, [good], [f]), good.finish()])
    np.testing.assert_array_equal(out, untrained.hashes(f, "audio"))


def test_hasher_rejects_bad_input(untrained):
    h = StreamingHasher(untrained)
    with pytest.raises(StreamError, match="shape"):
        h.push(np.zeros((3, 12), np.float32))
    bad = _frames(4)
    bad[2, 5] = np.nan
    with pytest.raises(StreamError, match="NaN"):
        h.push(bad)
    with pytest.raises(StreamError, match="1 streams but 2 frame arrays"):
        hash_step(untrained, [h], [_frames(2), _frames(2)])
    with pytest.raises(StreamError, match="modality"):
        StreamingHasher(untrained, "video")  # type: ignore[arg-type]
    h.finish()
    with pytest.raises(StreamError) as e:
        h.push(_frames(4))
    assert e.value.reason == "stream_finished"


# -------------------------------------------------------------------------------- embedder
def test_embedding_equals_the_index_window_that_starts_on_the_block(shipped):
    # Window 215 frames = 107 trunk steps, blocks of 22 frames = 11 steps: after 2·end + 2
    # frames the trunk has ``end`` complete steps; with end = 107 + 11·b the window is exactly
    # steps [11·b, 11·b + 107), i.e. the index window starting at frame 22·b (hop 22).
    enc = Encoder(shipped.config, shipped.nets, shipped.mean.cpu().numpy(),
                  shipped.std.cpu().numpy(), shipped.model_id, window=WindowSpec(215, 22))
    f = _frames(420, seed=5)
    index_windows, starts = enc.window_embeddings(f, "audio")
    for b in (0, 3, 7):
        e = StreamingEmbedder(enc, window_frames=215, block_frames=22)
        n = 2 * (107 + 11 * b) + 2
        i = 0
        for c in _chunks(n, "random", seed=b):
            e.push(f[i:i + c])
            i += c
        assert e.window_span == (22 * b, 22 * b + 214) and starts[b] == 22 * b
        np.testing.assert_allclose(e.embedding(), index_windows[b], atol=1e-5)


@pytest.mark.parametrize("n", [4, 5, 57, 230, 333])
def test_embedding_pools_the_whole_trunk_over_its_window_span(untrained, n):
    f = _frames(400, seed=n)
    e = StreamingEmbedder(untrained, window_frames=100, block_frames=10)
    for i in range(n):
        e.push(f[i:i + 1])
    a, b = e.window_span
    assert b == 2 * ((n - 2) // 2) and a % 10 == 0 and b - a <= 100
    net = untrained.nets["embed_audio"]
    with torch.inference_mode():
        h, s = net.trunk(untrained._prep(f))
        want = net.pool_head(h[:, a // 2:b // 2], s[:, a // 2:b // 2])[0].numpy()
        pooled = torch.softmax(s[0, a // 2:b // 2], 0) @ h[0, a // 2:b // 2]
    np.testing.assert_allclose(e.pooled(), pooled.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.embedding(), want, atol=1e-5)


@pytest.mark.parametrize("n", [57, 230, 333])
def test_views_pool_the_trunk_over_the_window_and_its_block_groups(untrained, n):
    f = _frames(400, seed=n)
    e = StreamingEmbedder(untrained, window_frames=100, block_frames=10, parts=2)
    plain = StreamingEmbedder(untrained, window_frames=100, block_frames=10)
    for i in range(n):
        e.push(f[i:i + 1])
        plain.push(f[i:i + 1])
    a, b = (x // 2 for x in e.window_span)  # trunk steps, blocks of 5
    blocks = list(range(a, b, 5))
    cut = blocks[-(-len(blocks) // 2)]  # np.array_split: the first group takes the odd block
    net = untrained.nets["embed_audio"]
    with torch.inference_mode():
        h, s = net.trunk(untrained._prep(f))
        want = torch.cat([net.pool_head(h[:, x:y], s[:, x:y])
                          for x, y in ((a, b), (a, cut), (cut, b))]).numpy()
    views = e.embedding()
    assert views.shape == (3, 128) and views.dtype == np.float32
    np.testing.assert_allclose(views, want, atol=1e-5)
    np.testing.assert_allclose(views[0], plain.embedding(), atol=1e-6)


def test_a_finished_stream_has_the_views_of_encoder_embed_views(shipped):
    f = _frames(88, seed=4)  # 44 trunk steps = 4 blocks of 11: halves on a block boundary
    e = StreamingEmbedder(shipped, parts=2)
    e.push(f)
    e.finish()
    np.testing.assert_allclose(e.embedding(), shipped.embed_views(f, "audio", 2), atol=1e-5)
    one = StreamingEmbedder(shipped, parts=2)  # one block: both halves are the whole window
    one.push(f[:20])
    one.finish()
    v = one.embedding()
    np.testing.assert_allclose(v, np.repeat(v[:1], 3, axis=0), atol=1e-6)
    with pytest.raises(StreamError, match="parts"):
        StreamingEmbedder(shipped, parts=-1)


@pytest.mark.parametrize("n", [2, 7, 120, 214])
def test_a_finished_stream_within_one_window_embeds_like_encoder_embed(shipped, n):
    f = _frames(n, seed=n)
    e = StreamingEmbedder(shipped)
    i = 0
    for c in _chunks(n, "random", seed=n):
        e.push(f[i:i + c])
        i += c
    e.finish()
    assert e.window_span == (0, 2 * (n // 2))
    np.testing.assert_allclose(e.embedding(), shipped.embed(f, "audio"), atol=1e-5)
    with pytest.raises(StreamError):
        e.push(f[:2])


def test_embedding_is_none_until_the_first_trunk_step(untrained):
    e = StreamingEmbedder(untrained)
    e.push(_frames(3))
    assert e.embedding() is None
    e.push(_frames(1))  # frames 0..3: the receptive field of step 0
    assert e.embedding().shape == (128,) and e.embedding().dtype == np.float32


def test_embed_step_batches_many_streams_like_each_alone(untrained):
    rng = np.random.default_rng(4)
    modalities = ["audio", "midi", "audio", "audio"]
    frames = [_frames(300, seed=10 + i) for i in range(4)]
    batched = [StreamingEmbedder(untrained, 120, 12, m) for m in modalities]
    alone = [StreamingEmbedder(untrained, 120, 12, m) for m in modalities]
    pos = [0] * 4
    for _ in range(40):
        new = []
        for i in range(4):
            c = int(rng.integers(0, 11)) if i != 3 else 0  # stream 3 stays silent
            new.append(frames[i][pos[i]:pos[i] + c])
            pos[i] += c
        embed_step(untrained, batched, new)
        for e, f in zip(alone, new, strict=True):
            e.push(f)
    got = embeddings(untrained, batched)
    assert got[3] is None
    for g, e in zip(got[:3], alone[:3], strict=True):
        assert g is not None
        np.testing.assert_allclose(g, e.embedding(), atol=1e-5)


def test_embedder_state_is_small_and_does_not_grow(shipped):
    e = StreamingEmbedder(shipped)  # 215-frame window, 22-frame blocks
    f = _frames(2000)
    sizes = []
    for i in range(0, 2000, 10):
        e.push(f[i:i + 10])
        sizes.append(e.nbytes)
    # 11 block slots × (384 features + max + sum) float64, plus ≤ 5 retained frames
    assert max(sizes) <= 11 * 386 * 8 + 5 * 48 * 4
    assert sizes[-1] == sizes[20]


def test_embedder_rejects_bad_window(untrained):
    with pytest.raises(StreamError) as e:
        StreamingEmbedder(untrained, window_frames=20, block_frames=7)
    assert e.value.reason == "bad_window"
    with pytest.raises(StreamError, match="another encoder"):
        embed_step(Encoder.untrained(1), [StreamingEmbedder(untrained)], [_frames(4)])
