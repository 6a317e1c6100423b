"""Named data sources with train / val / test splits, described by a small JSON-able dict
(kept in checkpoints, so evaluation can rebuild the same splits)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from .base import ClassImages
from .glyphs import make_glyphs
from .omniglot import default_omniglot_root, load_omniglot, split_omniglot

__all__ = ["DATA_SOURCES", "load_splits", "data_config"]

DATA_SOURCES = ("glyphs", "omniglot")


def data_config(
    source: str,
    root: Optional[str] = None,
    seed: int = 0,
    train_classes: int = 1000,
    val_classes: int = 100,
    test_classes: int = 200,
    per_class: int = 20,
    split_by: str = "character",
    fractions=(0.6, 0.1, 0.3),
) -> Dict[str, Any]:
    """The description of a data source that :func:`load_splits` reads.

    glyphs: ``seed`` (the world seed), class counts per split, ``per_class`` instances.
    omniglot: ``root`` (folder or zip; default :func:`default_omniglot_root`), ``split_by``
    (``"character"`` or ``"alphabet"``), ``fractions`` of train / val / test, ``seed`` of
    the split.
    """
    if source == "glyphs":
        return {
            "source": "glyphs",
            "seed": seed,
            "train_classes": train_classes,
            "val_classes": val_classes,
            "test_classes": test_classes,
            "per_class": per_class,
        }
    if source == "omniglot":
        return {"source": "omniglot", "root": root, "split_by": split_by, "fractions": list(fractions), "seed": seed}
    raise ValueError(f"unknown data source {source!r}: expected one of {DATA_SOURCES}")


def load_splits(config: Dict[str, Any], which=("train", "val", "test")) -> Dict[str, ClassImages]:
    """The splits ``which`` of the source described by ``config`` (see :func:`data_config`)."""
    source = config.get("source")
    if source == "glyphs":
        return {
            split: make_glyphs(split, int(config[f"{split}_classes"]), int(config["per_class"]), int(config["seed"]))
            for split in which
        }
    if source == "omniglot":
        root = config.get("root") or default_omniglot_root()
        if root is None:
            raise FileNotFoundError(
                "no Omniglot data: pass --data-root (a folder or zip in the official layout) or set S2M_OMNIGLOT_ROOT"
            )
        splits = split_omniglot(load_omniglot(root), config["split_by"], config["fractions"], int(config["seed"]))
        return {split: splits[split] for split in which}
    raise ValueError(f"unknown data source {source!r}: expected one of {DATA_SOURCES}")
