"""Built-in glyphs, the Omniglot reader (on the shared zip) and the episode sampler."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from s2m_ext.data import (
    SHARED_ZIP, ClassImages, EpisodeSampler, GlyphStyle, default_omniglot_root, load_omniglot, make_glyphs,
    split_classes, split_omniglot,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _omniglot_zip() -> Path:
    root = default_omniglot_root()
    if root is None or not (Path(root) / SHARED_ZIP).exists():
        pytest.skip(
            f"Omniglot data not found: set S2M_OMNIGLOT_ROOT or provide ../shared/data/omniglot/{SHARED_ZIP} next to the repository"
        )
    return Path(root) / SHARED_ZIP


@pytest.fixture(scope="module")
def omniglot() -> ClassImages:
    return load_omniglot(_omniglot_zip())


# ----------------------------------------------------------------------------- glyphs
def test_glyphs_are_deterministic_and_seed_dependent():
    a = make_glyphs("train", 6, 5, seed=3)
    b = make_glyphs("train", 6, 5, seed=3)
    c = make_glyphs("train", 6, 5, seed=4)
    assert torch.equal(a.images, b.images) and a.class_names == b.class_names
    assert not torch.equal(a.images, c.images)
    # Extending a split keeps its first classes: class k does not depend on how many are made.
    more = make_glyphs("train", 9, 5, seed=3)
    assert torch.equal(more.images[: 6 * 5], a.images)
    tail = make_glyphs("train", 3, 5, seed=3, first_class=6)
    assert torch.equal(more.images[6 * 5 :], tail.images)


def test_glyph_shapes_labels_and_ink():
    d = make_glyphs("val", 7, 4, seed=0)
    assert d.images.shape == (28, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels.tolist() == [c for c in range(7) for _ in range(4)]
    ink = d.images.float().mean((1, 2, 3)) / 255
    assert bool(((ink > 0.02) & (ink < 0.5)).all()), ink  # every glyph has strokes, none is a blob
    assert int(d.images.max()) == 255


def test_glyph_splits_are_disjoint():
    names = {split: set(make_glyphs(split, 20, 2, seed=0).class_names) for split in ("train", "val", "test")}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    imgs = {split: make_glyphs(split, 5, 2, seed=0).images for split in ("train", "test")}
    assert not torch.equal(imgs["train"], imgs["test"])


def test_glyph_classes_are_recognisable_but_instances_differ():
    # Leave-one-out 1-NN in pixel space: far above chance (1/30), far from perfect.
    d = make_glyphs("train", 30, 10, seed=1)
    x = d.images.float().flatten(1) / 255
    dist = torch.cdist(x, x).fill_diagonal_(float("inf"))
    accuracy = float((d.labels[dist.argmin(1)] == d.labels).float().mean())
    assert 0.4 < accuracy < 0.95, accuracy
    assert float(dist.min()) > 0  # no two instances are identical


def test_glyph_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        make_glyphs("dev", 2)
    with pytest.raises(ValueError, match="n_classes must be an int >= 1"):
        make_glyphs("train", 0)
    with pytest.raises(ValueError, match="min_strokes"):
        make_glyphs("train", 1, style=GlyphStyle(min_strokes=3, max_strokes=2))


# ----------------------------------------------------------------------------- omniglot
def test_omniglot_zip_counts_and_shapes(omniglot):
    # images_background_small1: 5 alphabets, 136 characters, 20 drawings each; x4 rotations.
    assert omniglot.n_classes == 136 * 4
    assert len(omniglot) == 136 * 20 * 4
    assert omniglot.images.shape[1:] == (1, 28, 28) and omniglot.images.dtype == torch.uint8
    assert torch.equal(omniglot.class_sizes(), torch.full((544,), 20))
    assert omniglot.meta["alphabets"] == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert torch.unique(omniglot.groups).numel() == 136
    ink = omniglot.images.float().mean() / 255
    assert 0.03 < ink < 0.4  # inverted: strokes are ink, the background is 0


def test_omniglot_rotations_are_rotated_copies(omniglot):
    name = omniglot.class_names[0]
    assert name.endswith("/rot0")
    base = omniglot.images[omniglot.indices_of(0)]
    for k, angle in enumerate((90, 180, 270), start=1):
        assert omniglot.class_names[k] == name.replace("rot0", f"rot{angle}")
        assert torch.equal(omniglot.images[omniglot.indices_of(k)], torch.rot90(base, k, dims=(2, 3)))


def test_omniglot_folder_equals_zip(tmp_path, omniglot):
    # Extract two characters in the official layout, one folder level deeper than the root.
    with zipfile.ZipFile(_omniglot_zip()) as archive:
        members = [n for n in archive.namelist() if "/Greek/character0" in n and n.endswith(".png")]
        members = [n for n in members if n.split("/")[-2] in ("character01", "character02")]
        archive.extractall(tmp_path / "data", members)
    folder = load_omniglot(tmp_path / "data", rotations=(0,))
    assert folder.class_names == ["Greek/character01/rot0", "Greek/character02/rot0"]
    for c, name in enumerate(folder.class_names):
        full = omniglot.class_names.index(name)
        assert torch.equal(folder.images[folder.indices_of(c)], omniglot.images[omniglot.indices_of(full)])


def test_omniglot_character_split_is_disjoint_and_complete(omniglot):
    splits = split_omniglot(omniglot, "character", (0.6, 0.1, 0.3), seed=0)
    chars = {k: {n.rsplit("/", 1)[0] for n in v.class_names} for k, v in splits.items()}
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])
    assert sum(len(c) for c in chars.values()) == 136
    assert sum(v.n_classes for v in splits.values()) == 544
    assert sum(len(v) for v in splits.values()) == len(omniglot)
    assert len(chars["test"]) == round(0.3 * 136) and len(chars["val"]) == round(0.1 * 136)
    for v in splits.values():  # all four rotations of a character stay together
        assert v.n_classes == 4 * len({n.rsplit("/", 1)[0] for n in v.class_names})
    again = split_omniglot(omniglot, "character", (0.6, 0.1, 0.3), seed=0)
    assert again["test"].class_names == splits["test"].class_names
    other = split_omniglot(omniglot, "character", (0.6, 0.1, 0.3), seed=1)
    assert other["test"].class_names != splits["test"].class_names


def test_omniglot_alphabet_split(omniglot):
    splits = split_omniglot(omniglot, "alphabet", (0.6, 0.2, 0.2), seed=0)
    alph = {k: {n.split("/")[0] for n in v.class_names} for k, v in splits.items()}
    assert [len(alph[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    assert set().union(*alph.values()) == set(omniglot.meta["alphabets"])


def test_omniglot_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_omniglot(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no Omniglot images"):
        load_omniglot(tmp_path / "empty")
    (tmp_path / "x.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        load_omniglot(tmp_path / "x.zip")
    with pytest.raises(ValueError, match="multiples of 90"):
        load_omniglot(tmp_path / "empty", rotations=(45,))


def test_split_classes_rejects_bad_fractions():
    d = make_glyphs("train", 4, 2)
    with pytest.raises(ValueError, match="summing to 1"):
        split_classes(d, d.groups, (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="cannot fill"):
        split_classes(d.subset([0, 1]), torch.arange(2), (0.5, 0.25, 0.25))


# ----------------------------------------------------------------------------- episodes
@pytest.fixture(scope="module")
def glyphs() -> ClassImages:
    return make_glyphs("train", 12, 20, seed=0)


def test_episode_tuples_follow_the_definition(glyphs):
    sampler = EpisodeSampler(glyphs, concept_size=10, n_relevant=8, n_irrelevant=12, noise=0.3, seed=1)
    batch = sampler.batch(step=3, start=0, stop=6)
    assert batch.concept.shape == (6, 10) and batch.relevant.shape == (6, 8) and batch.irrelevant.shape == (6, 12)
    labels = glyphs.labels
    for b in range(6):
        c = int(labels[batch.relevant[b, 0]])
        assert bool((labels[batch.relevant[b]] == c).all())
        concept_labels = labels[batch.concept[b]]
        assert int((concept_labels == c).sum()) == 7  # round(0.3 * 10) = 3 outliers
        assert bool((concept_labels[7:] != c).all())
        assert bool((labels[batch.irrelevant[b]] != c).all())
        assert not set(batch.concept[b].tolist()) & set(batch.relevant[b].tolist())
        assert len(set(batch.concept[b, :7].tolist())) == 7
    concept, queries = batch.images(glyphs)
    assert concept.shape == (6, 10, 1, 28, 28) and queries.shape == (6, 20, 1, 28, 28)
    assert concept.dtype == torch.float32 and float(concept.max()) <= 1.0
    torch.testing.assert_close(queries[:, :8], glyphs.images[batch.relevant].float() / 255)


def test_episodes_are_a_pure_function_of_seed_step_index(glyphs):
    a = EpisodeSampler(glyphs, seed=5)
    full = a.batch(step=7, start=0, stop=4)
    again = EpisodeSampler(glyphs, seed=5).batch(step=7, start=0, stop=4)
    shard = EpisodeSampler(glyphs, seed=5).batch(step=7, start=2, stop=4)
    for name in ("concept", "relevant", "irrelevant", "seeds"):
        assert torch.equal(getattr(full, name), getattr(again, name))
        assert torch.equal(getattr(full, name)[2:], getattr(shard, name))
    assert not torch.equal(full.concept, a.batch(step=8, start=0, stop=4).concept)
    assert not torch.equal(full.concept, EpisodeSampler(glyphs, seed=6).batch(step=7, start=0, stop=4).concept)


def test_polysemous_concepts_are_unions_of_two_classes(glyphs):
    sampler = EpisodeSampler(glyphs, concept_size=9, n_relevant=7, polysemy=1.0, seed=2)
    batch = sampler.batch(0, 0, 8)
    assert bool(batch.polysemous.all())
    for b in range(8):
        concept = glyphs.labels[batch.concept[b]].tolist()
        relevant = glyphs.labels[batch.relevant[b]].tolist()
        pair = sorted(set(concept))
        assert len(pair) == 2 and sorted(set(relevant)) == pair
        assert sorted(concept.count(c) for c in pair) == [4, 5] and sorted(relevant.count(c) for c in pair) == [3, 4]
        assert not set(glyphs.labels[batch.irrelevant[b]].tolist()) & set(pair)
    mixed = EpisodeSampler(glyphs, polysemy=0.5, seed=2).batch(0, 0, 40).polysemous.float().mean()
    assert 0.2 < float(mixed) < 0.8


def test_episode_sampler_rejects_impossible_settings(glyphs):
    with pytest.raises(ValueError, match="every class needs 25 images"):
        EpisodeSampler(glyphs, concept_size=15, n_relevant=10)
    with pytest.raises(ValueError, match="noise must be in"):
        EpisodeSampler(glyphs, noise=1.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        EpisodeSampler(glyphs.subset([0]))
