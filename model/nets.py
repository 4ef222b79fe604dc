"""The two learned networks of the seed work, one instance per modality (audio, MIDI).

Both take L2-normalised CQT frames, shape (batch, T, 48), at 21.53 frames/s.

``HashNet`` (DHS, Raffel & Ellis 2015): conv 5×12 → max-pool 2×2 → conv 3×3 → max-pool 2×2 →
dense → dense → B tanh, applied per (downsampled) time step; one hash frame per 4 CQT frames.
``EmbedNet`` (PSE, Raffel & Ellis 2016): conv 5×12 → max-pool 2×2 → feed-forward attention
(softmax over time of w·h_t + b) → dense → dense → 128 tanh.

The seed used 2,048-wide dense layers; we default to narrower ones so that indexing and the
live worker fit a 2-core CPU (see docs/model.md for what each width costs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

N_BINS = 48
HASH_DOWNSAMPLE = 4  # two 2×2 time poolings


@dataclass(frozen=True)
class NetConfig:
    """Hyper-parameters shared by the networks of one model."""

    n_bits: int = 32
    hash_hidden: int = 256
    embed_dim: int = 128
    embed_hidden: int = 256
    conv1_filters: int = 16
    conv2_filters: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


def _he_init(module: nn.Module) -> None:
    # He (Kaiming normal) init with zero biases, as in the seed code.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _ConvFront(nn.Module):
    """conv 5×12 (+ReLU) → max-pool 2×2 [→ conv 3×3 (+ReLU) → max-pool 2×2]."""

    def __init__(self, cfg: NetConfig, *, two_blocks: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            # 'same' padding for the even 12-bin kernel, spelled out (left 5, right 6 bins).
            nn.ZeroPad2d((5, 6, 2, 2)),
            nn.Conv2d(1, cfg.conv1_filters, (5, 12)),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        ]
        out_ch, out_freq = cfg.conv1_filters, N_BINS // 2
        if two_blocks:
            layers += [
                nn.Conv2d(cfg.conv1_filters, cfg.conv2_filters, (3, 3), padding="same"),
                nn.ReLU(),
                nn.MaxPool2d(2, 2),
            ]
            out_ch, out_freq = cfg.conv2_filters, N_BINS // 4
        self.body = nn.Sequential(*layers)
        self.out_features = out_ch * out_freq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, T, 48) → (batch, T', channels·freq) with T' = T // pool."""
        h = self.body(x.unsqueeze(1))  # (batch, C, T', F')
        b, c, t, f = h.shape
        return h.permute(0, 2, 1, 3).reshape(b, t, c * f)


class HashNet(nn.Module):
    """Frames (batch, T, 48) → hash activations (batch, T // 4, n_bits) in [-1, 1]."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.front = _ConvFront(cfg, two_blocks=True)
        self.head = nn.Sequential(
            nn.Linear(self.front.out_features, cfg.hash_hidden),
            nn.ReLU(),
            nn.Linear(cfg.hash_hidden, cfg.hash_hidden),
            nn.ReLU(),
            nn.Linear(cfg.hash_hidden, cfg.n_bits),
            nn.Tanh(),
        )
        _he_init(self)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.front(frames))


class EmbedNet(nn.Module):
    """Frames (batch, T, 48) → one embedding (batch, embed_dim) in [-1, 1]^embed_dim.

    ``trunk`` and ``pool_head`` are exposed separately so that a whole reference can be run
    through the convolutional trunk once and pooled over many windows of it.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.front = _ConvFront(cfg, two_blocks=False)
        self.attention = nn.Linear(self.front.out_features, 1)
        self.head = nn.Sequential(
            nn.Linear(self.front.out_features, cfg.embed_hidden),
            nn.ReLU(),
            nn.Linear(cfg.embed_hidden, cfg.embed_hidden),
            nn.ReLU(),
            nn.Linear(cfg.embed_hidden, cfg.embed_dim),
            nn.Tanh(),
        )
        _he_init(self)
        nn.init.normal_(self.attention.weight, std=self.front.out_features**-0.5)

    def trunk(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, T, 48) → features h (batch, T // 2, D) and attention scores (batch, T // 2)."""
        h = self.front(frames)
        return h, self.attention(h).squeeze(-1)

    def pool_head(
        self, h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention-pool h (batch, T', D) with scores (batch, T') → (batch, embed_dim).

        ``mask`` (batch, T') bool marks the valid steps; the softmax subtracts the max so that
        extreme scores neither overflow nor underflow.
        """
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("bt,btd->bd", weights, h)
        return self.head(pooled)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h, scores = self.trunk(frames)
        return self.pool_head(h, scores)
