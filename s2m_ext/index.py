"""s2m-index: embed a collection of images into descriptor shards for s2m-search.

The collection is an Omniglot zip or folder (``<Alphabet>/<characterNN>/*.png``), or any
folder of images (``*.png``, ``*.jpg``, ... at any depth; an image's label is its folder
relative to the collection). Images are read as in training (grey levels inverted so ink is
bright, resized to ``--image-size``), embedded by the checkpoint's network, and written as
``desc-00000.npy``, ... (float32, (n, D) each) with ``manifest.json``: the checkpoint, the
descriptor dimension, and per item its name and label, in the global index order.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ._extras import require

__all__ = ["embed", "load_model", "main", "read_collection"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST = "manifest.json"


def read_collection(path: Path, image_size: int) -> Tuple[np.ndarray, List[str], List[str]]:
    """(images (n, 1, S, S) uint8 with ink = 255, item names, labels) of a collection."""
    from .data.omniglot import _decode, _png_entries_in_zip

    if path.is_file() and path.suffix.lower() == ".zip":
        entries = [(f"{a}/{c}/{f}", f"{a}/{c}", data) for (a, c), f, data in _png_entries_in_zip(path)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        entries = [(str(p.relative_to(path)), str(p.parent.relative_to(path)), p.read_bytes()) for p in files]
    else:
        raise ValueError(f"{str(path)!r} is neither a folder of images nor a .zip of Omniglot images")
    if not entries:
        raise ValueError(f"{str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = np.stack([_decode(data, image_size, name) for name, _, data in entries])[:, None]
    return images, [e[0] for e in entries], [e[1] for e in entries]


def load_model(checkpoint: Path):
    from .nn.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    return model.eval()


def embed(model, images: np.ndarray, batch_size: int, progress: bool = False, desc: str = "embed") -> np.ndarray:
    """L2-normalised descriptors (n, D) of uint8 images (n, C, H, W), in the model's dtype."""
    tqdm = require("tqdm", "train", "the progress bar").tqdm
    dtype = next(model.parameters()).dtype
    out = []
    with torch.no_grad():
        for r0 in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, unit="batch"):
            x = torch.from_numpy(images[r0:r0 + batch_size]).to(dtype).div_(255.0)
            out.append(model.embed_items(x).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2m-index", description="Embed a collection of images into descriptor shards for s2m-search.")
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt checkpoint written by s2m-train")
    p.add_argument("--images", required=True, type=Path, help="a folder of images or an Omniglot .zip")
    p.add_argument("--out", required=True, type=Path, help="the index folder to write (shards + manifest.json)")
    p.add_argument("--shard-size", type=int, default=100_000, help="items per .npy shard (default 100000)")
    p.add_argument("--batch-size", type=int, default=256, help="images embedded at a time (default 256)")
    p.add_argument("--image-size", type=int, default=28, help="side the images are resized to (default 28)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    for name in ("shard_size", "batch_size", "image_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if not a.images.exists():
        p.error(f"--images {str(a.images)!r} does not exist")
    model = load_model(a.checkpoint)
    images, names, labels = read_collection(a.images, a.image_size)
    desc = embed(model, images, a.batch_size, progress=not a.no_progress).astype(np.float32)
    a.out.mkdir(parents=True, exist_ok=True)
    for old in a.out.glob("desc-*.npy"):
        old.unlink()
    shards = []
    for j, r0 in enumerate(range(0, len(desc), a.shard_size)):
        f = a.out / f"desc-{j:05d}.npy"
        np.save(f, desc[r0:r0 + a.shard_size])
        shards.append(f.name)
    manifest = {
        "checkpoint": str(a.checkpoint.resolve()), "images": str(a.images.resolve()), "image_size": a.image_size,
        "dim": int(desc.shape[1]), "count": len(names), "shards": shards, "names": names, "labels": labels,
    }
    (a.out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"indexed {len(names)} images ({len(set(labels))} labels) into {len(shards)} shard(s) in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
