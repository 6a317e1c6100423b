"""Omniglot reader for the official layout ``<root>/<Alphabet>/<characterNN>/*.png``.

``root`` may be a folder in that layout, a folder holding it at any depth (e.g. one with
``images_background/`` and ``images_evaluation/``), an official zip
(``images_background.zip``, ``images_background_small1.zip``, ...), or a folder holding
such zips. Images (105x105, 1-bit, black ink on white) are inverted to ink = 255 and
resized to 28x28 by area averaging; each rotation by 90, 180 and 270 degrees becomes an
extra class, as in the paper. Splits keep the rotations of one character together.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._extras import require
from .base import ClassImages

__all__ = ["load_omniglot", "split_classes", "split_omniglot", "default_omniglot_root", "SHARED_ZIP"]

#: The file tests and CI read from the shared data folder.
SHARED_ZIP = "images_background_small1.zip"


def default_omniglot_root() -> Optional[Path]:
    """Where the Omniglot data is, without a hard-coded path in the caller: the first that
    exists of ``$S2M_OMNIGLOT_ROOT``, ``<repository>/../shared/data/omniglot`` and
    ``/work/shared/data/omniglot``; None if none does."""
    candidates = []
    env = os.environ.get("S2M_OMNIGLOT_ROOT")
    if env:
        candidates.append(Path(env))
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data" / "omniglot", Path("/work/shared/data/omniglot")]
    return next((c for c in candidates if c.exists()), None)


def _png_entries_in_zip(path: Path) -> Iterator[Tuple[Tuple[str, str], str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            parts = PurePosixPath(name).parts
            if name.lower().endswith(".png") and len(parts) >= 3:
                yield (parts[-3], parts[-2]), parts[-1], archive.read(name)


def _png_entries_in_folder(path: Path) -> Iterator[Tuple[Tuple[str, str], str, bytes]]:
    pngs = sorted(p for p in path.rglob("*.png") if p.is_file())
    if pngs:
        for png in pngs:
            rel = png.relative_to(path).parts
            if len(rel) < 3:
                raise ValueError(
                    f"{png} is not in the Omniglot layout <root>/<Alphabet>/<characterNN>/<image>.png"
                )
            yield (rel[-3], rel[-2]), rel[-1], png.read_bytes()
        return
    zips = sorted(path.glob("*.zip"))
    if not zips:
        raise ValueError(f"no Omniglot images under {path}: expected <Alphabet>/<characterNN>/*.png files or official .zip files")
    for z in zips:
        yield from _png_entries_in_zip(z)


def _decode(data: bytes, size: int, source: str) -> np.ndarray:
    Image = require("PIL.Image", "train", "reading Omniglot images")
    try:
        img = Image.open(io.BytesIO(data)).convert("L")
    except Exception as exc:  # PIL raises several types for broken files
        raise ValueError(f"cannot read the image {source}: {exc}") from exc
    ink = Image.fromarray(255 - np.asarray(img, dtype=np.uint8))
    return np.asarray(ink.resize((size, size), Image.BOX), dtype=np.uint8)


def load_omniglot(root, image_size: int = 28, rotations: Sequence[int] = (0, 90, 180, 270)) -> ClassImages:
    """Read every character under ``root`` (see the module docstring).

    Args:
        root: folder or zip file.
        image_size: side of the resized images (default 28).
        rotations: angles (multiples of 90) whose rotated copies are classes of their own;
            ``(0,)`` keeps only the originals.

    Returns:
        ClassImages with ``len(rotations)`` classes per character, named
        ``"<Alphabet>/<characterNN>/rot<angle>"``; ``groups`` numbers the characters, so
        the rotations of one character share a group; ``meta["alphabets"]`` lists the
        alphabets found.
    """
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"Omniglot data root {str(path)!r} does not exist")
    if any(r % 90 for r in rotations) or len(set(r % 360 for r in rotations)) != len(rotations) or not rotations:
        raise ValueError(f"rotations must be distinct multiples of 90 degrees, got {tuple(rotations)}")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is neither a folder nor a zip file")
        entries = _png_entries_in_zip(path)
    else:
        entries = _png_entries_in_folder(path)

    by_character: Dict[Tuple[str, str], List[np.ndarray]] = {}
    for key, name, data in entries:
        by_character.setdefault(key, []).append(_decode(data, image_size, f"{key[0]}/{key[1]}/{name}"))
    if not by_character:
        raise ValueError(f"no Omniglot images found in {path}")

    characters = sorted(by_character)
    alphabets = sorted({a for a, _ in characters})
    images, labels, names, groups = [], [], [], []
    for g, key in enumerate(characters):
        base = torch.from_numpy(np.stack(by_character[key]))  # (n, H, W)
        for angle in rotations:
            label = len(names)
            images.append(torch.rot90(base, k=(angle // 90) % 4, dims=(1, 2)))
            labels.append(torch.full((base.shape[0],), label, dtype=torch.int64))
            names.append(f"{key[0]}/{key[1]}/rot{angle % 360}")
            groups.append(g)
    return ClassImages(
        images=torch.cat(images).unsqueeze(1).contiguous(),
        labels=torch.cat(labels),
        class_names=names,
        groups=torch.tensor(groups, dtype=torch.int64),
        meta={
            "source": "omniglot",
            "root": str(path),
            "image_size": image_size,
            "rotations": [int(r) for r in rotations],
            "alphabets": alphabets,
        },
    )


def split_classes(
    data: ClassImages, groups: torch.Tensor, fractions: Sequence[float], seed: int = 0, names: Sequence[str] = ("train", "val", "test")
) -> Dict[str, ClassImages]:
    """Split the classes of ``data`` by ``groups`` (n_classes,): the groups are shuffled
    (seeded) and dealt out in the given ``fractions`` (rounded, each split at least one
    group), so classes of one group never fall in two splits."""
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be {len(names)} non-negative numbers summing to 1, got {tuple(fractions)}")
    unique = torch.unique(groups)
    if unique.numel() < len(names):
        raise ValueError(f"{unique.numel()} groups cannot fill {len(names)} splits")
    perm = unique[torch.randperm(unique.numel(), generator=torch.Generator().manual_seed(seed))]
    counts = [max(1, int(round(f * unique.numel()))) for f in fractions]
    counts[0] = unique.numel() - sum(counts[1:])  # the first split takes the rounding remainder
    if counts[0] < 1:
        raise ValueError(f"fractions {tuple(fractions)} leave no group for the {names[0]!r} split")
    out, start = {}, 0
    for name, count in zip(names, counts):
        chosen = set(perm[start : start + count].tolist())
        start += count
        classes = [c for c in range(data.n_classes) if int(groups[c]) in chosen]
        out[name] = data.subset(classes, name)
    return out


def split_omniglot(
    data: ClassImages, by: str = "character", fractions: Sequence[float] = (0.6, 0.1, 0.3), seed: int = 0
) -> Dict[str, ClassImages]:
    """Train / val / test splits of Omniglot classes, disjoint by ``by``:

    * ``"character"``: characters (with all their rotations) are dealt out at random;
    * ``"alphabet"``: whole alphabets are (the harder, across-alphabet protocol).
    """
    if by == "character":
        groups = data.groups
    elif by == "alphabet":
        alphabets = [name.split("/")[0] for name in data.class_names]
        index = {a: i for i, a in enumerate(sorted(set(alphabets)))}
        groups = torch.tensor([index[a] for a in alphabets], dtype=torch.int64)
    else:
        raise ValueError(f"by must be 'character' or 'alphabet', got {by!r}")
    return split_classes(data, groups, fractions, seed)
