"""The weight average of fine-tunes of one model (`midimatch train soup`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.encoder import Encoder
from model.errors import MidimatchError
from model.nets import NetConfig
from model.training.soup import average_weights
from server.cli import main


def _saved(tmp_path, name: str, seed: int, config: NetConfig | None = None) -> str:
    path = tmp_path / f"{name}.pt"
    Encoder.untrained(seed, config).save(path)
    return str(path)


def test_the_soup_is_the_mean_of_every_weight_and_its_id_is_reproducible(tmp_path):
    a, b, c = (_saved(tmp_path, n, s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    soup = average_weights([a, b, c])
    models = [Encoder.load(p) for p in (a, b, c)]
    for name, net in soup.nets.items():
        for key, value in net.state_dict().items():
            expect = sum(m.nets[name].state_dict()[key] for m in models) / 3
            assert torch.allclose(value, expect, atol=1e-7), (name, key)
    assert not torch.equal(soup.nets["hash_audio"].state_dict()["head.0.weight"],
                           models[0].nets["hash_audio"].state_dict()["head.0.weight"])
    # a network equal in every model comes out unchanged, bit for bit
    same = average_weights([a, a])
    for name, net in same.nets.items():
        for key, value in net.state_dict().items():
            assert torch.equal(value, models[0].nets[name].state_dict()[key])
    # the command writes it; the same inputs give the same model id
    out1, out2 = tmp_path / "s1.pt", tmp_path / "s2.pt"
    assert main(["train", "soup", a, b, "--out", str(out1)]) == 0
    assert main(["train", "soup", a, b, "--out", str(out2)]) == 0
    assert Encoder.load(out1).model_id == Encoder.load(out2).model_id != Encoder.load(a).model_id
    np.testing.assert_array_equal(Encoder.load(out1).mean.numpy(), models[0].mean.numpy())


def test_models_of_other_lineages_are_refused(tmp_path):
    a = _saved(tmp_path, "a", 0)
    with pytest.raises(MidimatchError, match="at least two"):
        average_weights([a])
    other_bits = _saved(tmp_path, "b16", 1, NetConfig(n_bits=16))
    with pytest.raises(MidimatchError, match="network sizes"):
        average_weights([a, other_bits])
    shifted = Encoder.untrained(1)
    shifted.mean += 0.1
    shifted.save(tmp_path / "shifted.pt")
    with pytest.raises(MidimatchError, match="input statistics"):
        average_weights([a, str(tmp_path / "shifted.pt")])
