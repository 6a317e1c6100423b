"""s2m-search: rank an index written by s2m-index for concept sets given by examples.

Each ``--concept`` is a folder of example images (embedded with the index's checkpoint) or
a label of the indexed collection (its items are the examples). The concept models of the
checkpoint's Gaussian-mixture scorer are fitted to the examples and the whole index is
ranked by :func:`s2m_ext.search.topk_pool`, streaming the shards. Writes the ranked lists as
JSON and a contact sheet (PNG): one row per concept, its best ``--sheet`` results.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from ._extras import require
from .index import MANIFEST, embed, load_model, read_collection

__all__ = ["contact_sheet", "main"]


def contact_sheet(rows: List[List[np.ndarray]], thumb: int, pad: int = 2):
    """A PIL image of thumbnails (each (S, S) uint8, ink = 255, shown dark on white):
    len(rows) rows of max(len(row)) columns of ``thumb`` pixels with ``pad`` between."""
    Image = require("PIL.Image", "train", "the contact sheet")
    cols = max([len(r) for r in rows] + [1])
    sheet = Image.new("L", (cols * (thumb + pad) + pad, len(rows) * (thumb + pad) + pad), 255)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = Image.fromarray(255 - img).resize((thumb, thumb), Image.NEAREST)
            sheet.paste(tile, (pad + j * (thumb + pad), pad + i * (thumb + pad)))
    return sheet


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2m-search", description="Rank an s2m-index index for concept sets.")
    p.add_argument("--index", required=True, type=Path, help="a folder written by s2m-index")
    p.add_argument("--concept", required=True, action="append",
                   help="a folder of example images, or a label of the indexed collection (repeatable)")
    p.add_argument("--k", type=int, default=20, help="results kept per concept (default 20)")
    p.add_argument("--out", required=True, type=Path, help="the ranked lists (JSON)")
    p.add_argument("--sheet", type=int, default=8, help="results per concept on the contact sheet (default 8; 0: none)")
    p.add_argument("--sheet-out", type=Path, default=None, help="the contact sheet (default: --out with .png)")
    p.add_argument("--thumb", type=int, default=48, help="thumbnail side in pixels (default 48)")
    p.add_argument("--chunk-size", type=int, default=None, help="index rows scored at a time")
    p.add_argument("--batch-size", type=int, default=256, help="example images embedded at a time (default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    tqdm = require("tqdm", "train", "the progress bar").tqdm
    from .gmm import DiagGMM
    from .search import topk_pool

    p = parser()
    a = p.parse_args(argv)
    for name in ("k", "thumb", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.sheet < 0:
        p.error(f"--sheet must be >= 0, got {a.sheet}")
    if a.chunk_size is not None and a.chunk_size < 1:
        p.error(f"--chunk-size must be >= 1, got {a.chunk_size}")
    manifest_path = a.index / MANIFEST
    if not manifest_path.is_file():
        p.error(f"--index {str(a.index)!r} has no {MANIFEST}: pass a folder written by s2m-index")
    manifest = json.loads(manifest_path.read_text())
    labels = np.asarray(manifest["labels"])
    shards = [np.load(a.index / s, mmap_mode="r") for s in manifest["shards"]]
    model = load_model(Path(manifest["checkpoint"]))
    dtype = next(model.parameters()).dtype
    examples = []
    for c in tqdm(a.concept, desc="concepts", disable=a.no_progress, unit="concept"):
        if Path(c).is_dir():
            images, _, _ = read_collection(Path(c), manifest["image_size"])
            examples.append(torch.from_numpy(embed(model, images, a.batch_size)))
        elif c in set(manifest["labels"]):
            rows = np.flatnonzero(labels == c)
            examples.append(torch.from_numpy(np.concatenate([s for s in shards])[rows] if len(shards) > 1 else np.asarray(shards[0][rows])))
        else:
            p.error(f"--concept {c!r} is neither a folder of images nor a label of the index (e.g. {manifest['labels'][0]!r})")
    n = max(e.shape[0] for e in examples)
    desc = torch.zeros(len(examples), n, manifest["dim"], dtype=dtype)
    mask = torch.zeros(len(examples), n, dtype=torch.bool)
    for b, e in enumerate(examples):
        desc[b, : e.shape[0]], mask[b, : e.shape[0]] = e.to(dtype), True
    with torch.no_grad():
        state = model.fit(desc, mask, torch.Generator().manual_seed(0))
        if not isinstance(state, DiagGMM):
            p.error(f"the checkpoint's scorer ({model.scorer_name}) is not a Gaussian mixture; s2m-search needs one")
        pool = shards if dtype == torch.float32 else [s.astype(np.float64) for s in shards]
        values, indices = topk_pool(state.detach(), pool, a.k, chunk_size=a.chunk_size)
    results = []
    for c, v, i in zip(a.concept, values.tolist(), indices.tolist()):
        results.append({"concept": c, "results": [
            {"rank": r + 1, "index": j, "name": manifest["names"][j], "label": manifest["labels"][j], "score": s}
            for r, (s, j) in enumerate(zip(v, i))]})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"index": str(a.index.resolve()), "k": a.k, "concepts": results}, indent=1))
    if a.sheet:
        source = Path(manifest["images"])
        images, names, _ = read_collection(source, manifest["image_size"])
        if names != manifest["names"]:
            p.error(f"the indexed images {str(source)!r} changed since indexing; re-run s2m-index")
        rows = [[images[j, 0] for j in i[: a.sheet]] for i in indices.tolist()]
        sheet_out = a.sheet_out or a.out.with_suffix(".png")
        contact_sheet(rows, a.thumb).save(sheet_out)
        print(f"wrote {a.out} and {sheet_out}")
    else:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
