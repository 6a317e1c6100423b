"""Data for Set2Model: built-in procedural glyphs, an Omniglot reader, an episode sampler.

    from s2m_ext.data import make_glyphs, load_omniglot, split_omniglot, EpisodeSampler
    train = make_glyphs("train", n_classes=1000)              # no download
    splits = split_omniglot(load_omniglot(root), by="character")
    sampler = EpisodeSampler(train, concept_size=10, noise=0.3)
    batch = sampler.batch(step=0, start=0, stop=5)          # 5 (concept, relevant, irrelevant) tuples
"""

from .base import ClassImages, mix_seed
from .episodes import EpisodeBatch, EpisodeSampler
from .glyphs import GlyphStyle, make_glyphs
from .omniglot import SHARED_ZIP, default_omniglot_root, load_omniglot, split_classes, split_omniglot
from .sources import DATA_SOURCES, load_splits

__all__ = [
    "ClassImages",
    "DATA_SOURCES",
    "EpisodeBatch",
    "EpisodeSampler",
    "GlyphStyle",
    "SHARED_ZIP",
    "default_omniglot_root",
    "load_omniglot",
    "load_splits",
    "make_glyphs",
    "mix_seed",
    "split_classes",
    "split_omniglot",
]
