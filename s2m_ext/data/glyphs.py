"""Built-in data that needs no download: procedurally generated handwritten-like glyphs.

Each class is a random stroke program: 1 to 4 pen strokes, each a cubic Bezier curve, some
starting on an earlier stroke (like the joined strokes of a character). Each instance is a
jittered rendering of its class's program: every control point moves a little, the whole
glyph is rotated, scaled, sheared and shifted, and the pen width varies. Images are
anti-aliased 28x28 (ink = 255, like the inverted Omniglot images).

Everything is a deterministic function of (seed, class id, instance): the same call gives
the same images on every machine. The class ids of the three splits interleave
(train: 3k, validation: 3k+1, test: 3k+2), so the splits are disjoint and each can hold
any number of classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Tuple

import torch
from torch import Tensor

from .base import ClassImages, mix_seed

__all__ = ["GlyphStyle", "make_glyphs", "SPLITS"]

SPLITS = ("train", "val", "test")
_CURVE_POINTS = 12  # points per rendered Bezier curve (11 segments)


@dataclass(frozen=True)
class GlyphStyle:
    """How glyph classes are drawn and how much instances of a class vary (unit square)."""

    min_strokes: int = 1
    max_strokes: int = 4
    stroke_step: Tuple[float, float] = (0.15, 0.4)  # distance between consecutive control points
    extent: float = 0.62  # longer side of a class's bounding box (before instance jitter)
    attach_prob: float = 0.6  # a stroke after the first starts on an earlier stroke
    jitter: float = 0.04  # per-instance std of every control point
    rotation_deg: float = 12.0  # per-instance rotation, uniform in +-
    scale: Tuple[float, float] = (0.85, 1.1)
    shear: float = 0.15
    shift: float = 0.06
    pen: Tuple[float, float] = (0.028, 0.05)  # half-width of the pen
    size: int = 28


def _class_program(gen: torch.Generator, style: GlyphStyle) -> Tuple[Tensor, int]:
    """Control points (max_strokes, 4, 2) and the number of strokes of one class."""
    n_strokes = int(torch.randint(style.min_strokes, style.max_strokes + 1, (1,), generator=gen))
    ctrl = torch.zeros(style.max_strokes, 4, 2, dtype=torch.float64)
    lo, hi = style.stroke_step
    for s in range(n_strokes):
        if s > 0 and float(torch.rand(1, generator=gen)) < style.attach_prob:
            prev = int(torch.randint(0, s, (1,), generator=gen))
            start = _bezier(ctrl[prev : prev + 1], torch.rand(1, generator=gen, dtype=torch.float64))[0, 0]
        else:
            start = 0.2 + 0.6 * torch.rand(2, generator=gen, dtype=torch.float64)
        points = [start]
        heading = 2 * math.pi * float(torch.rand(1, generator=gen))
        for _ in range(3):
            heading += float(torch.randn(1, generator=gen)) * 1.0
            step = lo + (hi - lo) * float(torch.rand(1, generator=gen))
            nxt = points[-1] + step * torch.tensor([math.cos(heading), math.sin(heading)], dtype=torch.float64)
            points.append(nxt.clamp(0.1, 0.9))
        ctrl[s] = torch.stack(points)
    # Centre the glyph and scale its longer side to fill the box, as a writer would.
    used = ctrl[:n_strokes].reshape(-1, 2)
    lo_xy, hi_xy = used.amin(0), used.amax(0)
    extent = float((hi_xy - lo_xy).max().clamp_min(1e-6))
    ctrl[:n_strokes] = (ctrl[:n_strokes] - (lo_xy + hi_xy) / 2) * (style.extent / extent) + 0.5
    return ctrl, n_strokes


def _bezier(ctrl: Tensor, t: Tensor) -> Tensor:
    """Cubic Bezier points: ctrl (..., 4, 2), t (T,) -> (..., T, 2)."""
    t = t.to(ctrl.dtype).view(-1, 1)
    u = 1 - t
    basis = torch.cat([u**3, 3 * u**2 * t, 3 * u * t**2, t**3], dim=1)  # (T, 4)
    return torch.einsum("tk,...kd->...td", basis, ctrl)


def _instances(ctrl: Tensor, n: int, gen: torch.Generator, style: GlyphStyle) -> Tuple[Tensor, Tensor]:
    """Jittered control points (n, S, 4, 2) and pen half-widths (n,) of n instances."""
    pts = ctrl.unsqueeze(0) + style.jitter * torch.randn(n, *ctrl.shape, generator=gen, dtype=torch.float64)
    angle = math.radians(style.rotation_deg) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    scale = style.scale[0] + (style.scale[1] - style.scale[0]) * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    shear = style.shear * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    shift = style.shift * (2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1)
    pen = style.pen[0] + (style.pen[1] - style.pen[0]) * torch.rand(n, generator=gen, dtype=torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    shr = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shr[:, 0, 1] = shear
    affine = rot @ shr @ torch.diag_embed(scale)
    centred = pts - 0.5
    pts = torch.einsum("nij,nskj->nski", affine, centred) + 0.5 + shift.view(n, 1, 1, 2)
    return pts, pen


def _render(ctrl: Tensor, n_strokes: Tensor, pen: Tensor, size: int) -> Tensor:
    """Anti-aliased ink images (n, size, size) in [0, 1] of the strokes ctrl (n, S, 4, 2)."""
    n, max_strokes = ctrl.shape[:2]
    curve = _bezier(ctrl, torch.linspace(0, 1, _CURVE_POINTS, dtype=torch.float64))  # (n, S, T, 2)
    a, b = curve[:, :, :-1], curve[:, :, 1:]  # segments (n, S, T-1, 2)
    live = (torch.arange(max_strokes).view(1, -1) < n_strokes.view(-1, 1)).view(n, max_strokes, 1)
    a, b = a.reshape(n, -1, 2), b.reshape(n, -1, 2)
    live = live.expand(n, max_strokes, _CURVE_POINTS - 1).reshape(n, -1)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    px = coords.view(1, 1, size, 1).expand(1, size, size, 1).reshape(1, -1, 1)  # (1, P, 1) column
    py = coords.view(1, size, 1, 1).expand(1, size, size, 1).reshape(1, -1, 1)  # row
    a, b = a.float(), b.float()
    ax, ay = a[..., 0].unsqueeze(1), a[..., 1].unsqueeze(1)  # (n, 1, G)
    dx, dy = (b[..., 0] - a[..., 0]).unsqueeze(1), (b[..., 1] - a[..., 1]).unsqueeze(1)
    apx, apy = px - ax, py - ay  # (n, P, G)
    t = ((apx * dx + apy * dy) / (dx * dx + dy * dy).clamp_min(1e-12)).clamp_(0, 1)
    dist2 = (apx - t * dx).square_() + (apy - t * dy).square_()
    dist = dist2.masked_fill_(~live.unsqueeze(1), math.inf).amin(-1).sqrt_()  # (n, P)
    ink = ((pen.view(-1, 1).float() - dist) * size + 0.5).clamp(0, 1)  # one pixel of anti-aliasing
    return ink.view(n, size, size)


def make_glyphs(
    split: str = "train",
    n_classes: int = 100,
    n_per_class: int = 20,
    seed: int = 0,
    style: GlyphStyle = GlyphStyle(),
    first_class: int = 0,
) -> ClassImages:
    """Render ``n_classes`` glyph classes of ``split`` with ``n_per_class`` instances each.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint class ids, see module doc).
        n_classes: number of classes (any number).
        n_per_class: instances per class.
        seed: the world seed: the same seed gives the same classes and instances.
        style: the drawing parameters.
        first_class: index of the first class within the split (to extend a set).

    Returns:
        ClassImages with (n_classes * n_per_class, 1, size, size) uint8 images.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for value, name in ((n_classes, "n_classes"), (n_per_class, "n_per_class")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not 1 <= style.min_strokes <= style.max_strokes:
        raise ValueError(f"style needs 1 <= min_strokes <= max_strokes, got {style.min_strokes}, {style.max_strokes}")
    offset = SPLITS.index(split)
    images, names = [], []
    for k in range(first_class, first_class + n_classes):
        class_id = 3 * k + offset
        ctrl, n_strokes = _class_program(torch.Generator().manual_seed(mix_seed(seed, class_id, 0)), style)
        pts, pen = _instances(ctrl, n_per_class, torch.Generator().manual_seed(mix_seed(seed, class_id, 1)), style)
        ink = _render(pts, torch.full((n_per_class,), n_strokes), pen, style.size)
        images.append((ink * 255).round().to(torch.uint8))
        names.append(f"glyph{class_id}")
    images_t = torch.stack(images).view(n_classes * n_per_class, 1, style.size, style.size)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    meta = {"source": "glyphs", "split": split, "seed": seed, "style": asdict(style), "first_class": first_class}
    return ClassImages(images_t, labels, names, torch.arange(n_classes), meta)
