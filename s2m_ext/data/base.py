"""A labelled image collection organised by class, the common currency of the data sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import Tensor

__all__ = ["ClassImages", "mix_seed"]

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finalizer over each part): distinct tuples give
    unrelated streams, so (seed, step, index) names one random draw forever."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


@dataclass
class ClassImages:
    """Images with class labels.

    Attributes:
        images: (M, C, H, W) uint8 images (0 = background, 255 = ink).
        labels: (M,) int64 class of each image, in [0, n_classes).
        class_names: one name per class (e.g. ``"Greek/character03/rot90"``).
        groups: (n_classes,) int64 group of each class: classes that must fall in the same
            split share a group (the rotations of one Omniglot character; for the glyphs,
            each class is its own group).
        meta: free-form description of the source (kept in checkpoints and results).
    """

    images: Tensor
    labels: Tensor
    class_names: List[str]
    groups: Tensor
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be a (M, C, H, W) uint8 tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 tensor of shape ({self.images.shape[0]},)")
        if self.groups.shape != (len(self.class_names),):
            raise ValueError(f"groups must have one entry per class ({len(self.class_names)}), got {tuple(self.groups.shape)}")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")
        counts = torch.bincount(self.labels, minlength=len(self.class_names))
        if len(self.class_names) and int(counts.min()) == 0:
            raise ValueError(f"class {self.class_names[int(counts.argmin())]!r} has no image")
        self._order = torch.argsort(self.labels, stable=True)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def class_sizes(self) -> Tensor:
        """(n_classes,) images per class."""
        return self._offsets[1:] - self._offsets[:-1]

    def indices_of(self, c: int) -> Tensor:
        """Indices (into ``images``) of the images of class ``c``."""
        return self._order[self._offsets[c] : self._offsets[c + 1]]

    def float_images(self, index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Images ``index`` (any shape S) as floats in [0, 1]: S + (C, H, W)."""
        return self.images[index.flatten()].to(dtype).div_(255.0).reshape(*index.shape, *self.images.shape[1:])

    def subset(self, classes: Sequence[int], name: str = "") -> "ClassImages":
        """The images of ``classes`` (relabelled 0..len(classes)-1 in the given order)."""
        classes = torch.as_tensor(list(classes), dtype=torch.int64)
        remap = torch.full((self.n_classes,), -1, dtype=torch.int64)
        remap[classes] = torch.arange(classes.numel())
        keep = remap[self.labels] >= 0
        meta = dict(self.meta)
        if name:
            meta["split"] = name
        return ClassImages(
            images=self.images[keep],
            labels=remap[self.labels[keep]],
            class_names=[self.class_names[int(c)] for c in classes],
            groups=self.groups[classes],
            meta=meta,
        )
