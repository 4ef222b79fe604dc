"""A weight average ("model soup"): the element-wise mean of models fine-tuned from one another.

Two fine-tunes of one model on different pairs make different errors on sound neither heard;
the mean of their weights often carries over better than either (the shipped ``default.pt`` is
the mean of ``motion6`` and its fine-tune on overdriven renders, docs/model.md). Only models of
one lineage can be averaged: the same network sizes and the same input statistics (a fine-tune
keeps its init's); a network that is the same in every model (e.g. an embedding left untouched)
comes out unchanged.

    midimatch train soup A.pt B.pt [C.pt ...] --out SOUP.pt
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from model.encoder import Encoder
from model.errors import MidimatchError


def average_weights(paths: Sequence[str | Path]) -> Encoder:
    """The mean of the models at ``paths`` (at least two), as a new :class:`Encoder` whose
    ``model_id`` is the placeholder ``"soup"`` (``save`` computes the real one).

    Raises
    ------
    MidimatchError
        ``bad_model`` when fewer than two are given, or their network sizes or input
        statistics differ (they are not fine-tunes of one model).
    """
    if len(paths) < 2:
        raise MidimatchError("a soup needs at least two weights files", reason="bad_model")
    models = [Encoder.load(p) for p in paths]
    first = models[0]
    for p, m in zip(paths[1:], models[1:], strict=True):
        if m.config != first.config:
            raise MidimatchError(f"{p} has other network sizes than {paths[0]} "
                                 f"({m.config} vs {first.config})", reason="bad_model")
        if not (torch.equal(m.mean, first.mean) and torch.equal(m.std, first.std)):
            raise MidimatchError(f"{p} has other input statistics than {paths[0]}: not a "
                                 "fine-tune of the same model", reason="bad_model")
    nets = {}
    for name, net in first.nets.items():
        states = [m.nets[name].state_dict() for m in models]
        mean = {k: sum((s[k] for s in states[1:]), states[0][k].clone()) / len(states)
                for k in states[0]}
        net.load_state_dict(mean)
        nets[name] = net
    return Encoder(first.config, nets, first.mean.cpu().numpy(), first.std.cpu().numpy(),
                   "soup", window=first.window)
