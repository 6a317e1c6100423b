"""Embedding networks for small grey-level images (Omniglot, the built-in glyphs)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvEmbedding"]


class ConvEmbedding(nn.Module):
    """The usual few-shot Omniglot CNN: ``depth`` blocks of 3x3 conv, GroupNorm, ReLU and 2x2
    max-pooling, then a linear map to ``dim`` descriptors.

    GroupNorm instead of BatchNorm keeps every image's descriptor independent of the other
    images in its batch: a concept set, its queries and a data-parallel shard then give the
    same descriptors however they are batched, in training and evaluation alike. The convs
    have no bias: GroupNorm subtracts the group mean, so a bias would be nearly redundant,
    with gradients that are mostly rounding noise (which Adam would amplify).

    Args:
        in_channels: image channels (1 for Omniglot).
        dim: descriptor size D (default 64, the paper's Omniglot classification size).
        width: channels of every conv block (default 64).
        depth: conv blocks (default 4: 28x28 -> 1x1).
        groups: GroupNorm groups (default 8; must divide ``width``).

    Shapes: (N, in_channels, H, W) -> (N, dim), not normalised (Set2Model L2-normalises).
    """

    def __init__(self, in_channels: int = 1, dim: int = 64, width: int = 64, depth: int = 4, groups: int = 8) -> None:
        super().__init__()
        for value, name in ((in_channels, "in_channels"), (dim, "dim"), (width, "width"), (depth, "depth"), (groups, "groups")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if width % groups:
            raise ValueError(f"groups ({groups}) must divide width ({width})")
        blocks = []
        channels = in_channels
        for _ in range(depth):
            blocks += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),  # GroupNorm's shift replaces it
                nn.GroupNorm(groups, width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size >= 2**depth works
        self.head = nn.Linear(width, dim)
        self.dim = dim
        self.config = {"in_channels": in_channels, "dim": dim, "width": width, "depth": depth, "groups": groups}

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))
