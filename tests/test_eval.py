"""The retrieval protocol (AP, concept sampling) and s2m-eval, including its error messages."""

from __future__ import annotations

import json

import pytest
import torch

from s2m_ext.eval import confidence_interval, main
from s2m_ext.nn import AvgScorer, NNScorer, average_precision
from s2m_ext.nn.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from s2m_ext.nn.retrieval import embed_all, retrieval_ap, retrieval_scores, sample_concepts, sample_polysemous_concepts
from s2m_ext.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three tiny trained runs: S2M-GMM2, AVG-FT and a PL classifier (validated with AVG)."""
    root = tmp_path_factory.mktemp("eval")
    paths = {}
    for name, scorer, objective in (("gmm2", "gmm2", "histogram"), ("avg", "avg", "histogram"), ("pl", "avg", "classify")):
        cfg = TrainConfig(data="glyphs", train_classes=20, val_classes=5, test_classes=8, per_class=20, tuples=4,
                          width=8, depth=2, dim=8, steps=3, val_every=1000, threads=1, progress=False,
                          scorer=scorer, objective=objective, out=str(root / name))
        train(cfg)
        paths[name] = root / name / "last.pt"
    return paths


# ----------------------------------------------------------------------------- protocol
def test_average_precision_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 40, generator=g, dtype=torch.float64)
    relevant = torch.rand(6, 40, generator=g) < 0.3
    relevant[:, 0] = True
    got = average_precision(scores, relevant)
    for b in range(6):
        want = sklearn.average_precision_score(relevant[b].numpy(), scores[b].numpy())
        assert got[b].item() == pytest.approx(want, abs=1e-12)


def test_average_precision_ignores_excluded_items():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 30, generator=g, dtype=torch.float64)
    relevant = torch.rand(3, 30, generator=g) < 0.4
    relevant[:, :2] = True
    valid = torch.ones(3, 30, dtype=torch.bool)
    valid[:, 10:15] = False
    scores_hi = scores.clone()
    scores_hi[:, 10:15] = 100.0  # excluded items must not count, however high they score
    got = average_precision(scores_hi, relevant, valid)
    keep = torch.cat([torch.arange(10), torch.arange(15, 30)])
    torch.testing.assert_close(got, average_precision(scores[:, keep], relevant[:, keep]))
    assert average_precision(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[True, False, True]])).item() == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="at least one relevant"):
        average_precision(scores, torch.zeros(3, 30, dtype=torch.bool))


def test_sample_concepts_and_retrieval_ap():
    labels = torch.arange(5).repeat_interleave(6)
    concepts = sample_concepts(labels, 4, 0.5, torch.Generator().manual_seed(0))
    assert concepts.shape == (5, 4)
    for c in range(5):
        assert (labels[concepts[c, :2]] == c).all() and (labels[concepts[c, 2:]] != c).all()
    # Perfect descriptors (one-hot by class) rank every relevant item first: AP = 1 for all.
    desc = torch.nn.functional.one_hot(labels, 5).double()
    clean = sample_concepts(labels, 3, 0.0, torch.Generator().manual_seed(0))
    ap = retrieval_ap(retrieval_scores(AvgScorer(), desc, clean), labels, clean)
    torch.testing.assert_close(ap, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="leaves none to retrieve"):
        sample_concepts(labels, 6, 0.0, torch.Generator())


def test_retrieval_ap_by_hand_with_the_concept_items_on_top():
    """Two classes of four 1-D items; each concept set holds the two items its own model
    scores highest. Ranked without them (the protocol), class 0 (model = mean 10, score 10 z)
    ranks items 2 (relevant), 4, 3 (relevant), 5, 6, 7: AP = (1/1 + 2/3) / 2 = 5/6; class 1
    (score -10 z) ranks 5 (relevant), 3, 4 (relevant), 2, 0, 1: AP = 5/6 too. With the
    concept items left in they would come first (AP 0.95 if counted relevant, 11/30 if not)."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    desc = torch.tensor([[10.0], [10.0], [3.0], [1.0], [2.0], [0.5], [-10.0], [-10.0]], dtype=torch.float64)
    concepts = torch.tensor([[0, 1], [6, 7]])
    scores = retrieval_scores(AvgScorer(), desc, concepts)
    torch.testing.assert_close(scores, torch.cat([10.0 * desc.T, -10.0 * desc.T]))
    torch.testing.assert_close(retrieval_ap(scores, labels, concepts), torch.full((2,), 5 / 6, dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_confidence_interval():
    lo, hi = confidence_interval([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - lo == pytest.approx(2 * 4.302653 * 1 / 3**0.5, rel=1e-5)
    assert confidence_interval([0.5]) == (0.5, 0.5)


# ----------------------------------------------------------------------------- s2m-eval
def test_eval_table_json_and_figure(tmp_path, checkpoints, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main([f"{checkpoints['gmm2']}", f"AVG-FT={checkpoints['avg']}", "--scorers", "own", "gauss",
                 "--noise", "0", "0.3", "--seeds", "2", "--json", str(out_json), "--png", str(out_png), "--threads", "1"])
    assert code == 0
    table = capsys.readouterr().out
    for label in ("S2M-GMM2", "Gauss on S2M-GMM2", "AVG-FT", "Gauss on AVG-FT", "mAP, noise 0.3"):
        assert label in table
    result = json.loads(out_json.read_text())
    assert [r["label"] for r in result["rows"]] == ["S2M-GMM2", "Gauss on S2M-GMM2", "AVG-FT", "Gauss on AVG-FT"]
    assert result["settings"]["n_classes"] == 8
    for row in result["rows"]:
        for cell in row["noise"].values():
            assert 0.0 < cell["map"] <= 1.0 and cell["ci95"][0] <= cell["map"] <= cell["ci95"][1]
            assert cell["ci_over"] == "2 concept-set draws" and len(cell["raw"][0]) == 2
    assert out_png.stat().st_size > 10_000


def test_eval_agrees_with_the_protocol_by_hand(tmp_path, checkpoints):
    main([f"{checkpoints['avg']}", "--noise", "0", "--seeds", "1", "--json", str(tmp_path / "r.json")])
    got = json.loads((tmp_path / "r.json").read_text())["rows"][0]["noise"]["0.0"]["map"]
    from s2m_ext.data import make_glyphs
    from s2m_ext.data.base import mix_seed

    model = model_from_checkpoint(load_checkpoint(checkpoints["avg"])).eval()
    test = make_glyphs("test", 8, 20, 0)
    concepts = sample_concepts(test.labels, 10, 0.0, torch.Generator().manual_seed(mix_seed(0, 0)))
    desc = embed_all(model, test.images)
    scores = retrieval_scores(model.scorer, desc, concepts)
    # AP of each class's ranking of the images outside its concept set, by scikit-learn
    # (independent of retrieval_ap, which s2m-eval uses).
    sklearn = pytest.importorskip("sklearn.metrics")
    aps = []
    for c in range(concepts.shape[0]):
        outside = torch.ones(len(test.labels), dtype=torch.bool)
        outside[concepts[c]] = False
        relevant = (test.labels[outside] == c).numpy()
        aps.append(sklearn.average_precision_score(relevant, scores[c, outside].double().numpy()))
    assert got == pytest.approx(sum(aps) / len(aps), abs=1e-12)


def test_eval_on_a_bad_path_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "missing.pt")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "s2m-eval: error: checkpoint" in err and "missing.pt" in err and "does not exist" in err
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err


def test_eval_on_a_checkpoint_of_another_model_fails_clearly(tmp_path, checkpoints, capsys):
    foreign = tmp_path / "resnet.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), foreign)
    with pytest.raises(SystemExit) as info:
        main([str(foreign)])
    assert info.value.code == 2
    assert "is not an s2m_ext Set2Model checkpoint" in capsys.readouterr().err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(SystemExit):
        main([str(garbage)])
    assert "is not a checkpoint torch can read" in capsys.readouterr().err

    # Our format, but the weights belong to another architecture than the one declared.
    payload = load_checkpoint(checkpoints["avg"])
    payload["model"]["embedding"]["width"] = 16
    tampered = tmp_path / "tampered.pt"
    save_checkpoint(tampered, {k: v for k, v in payload.items() if k not in ("format", "version")})
    with pytest.raises(SystemExit):
        main([str(tampered)])
    assert "weights do not fit the model it describes" in capsys.readouterr().err


def test_eval_rejects_bad_options(tmp_path, checkpoints, capsys):
    with pytest.raises(SystemExit):
        main([str(checkpoints["avg"]), "--scorers", "svr"])
    assert "unknown scorer 'svr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(checkpoints["avg"]), "--scorers", "svm", "--svm-negatives", "0"])
    assert "--svm-negatives must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(checkpoints["avg"]), "--scorers", "svm", "--svm-negatives", "100000"])
    assert "--svm-negatives must be an int in [1, 400]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(checkpoints["avg"]), "--data-root", str(tmp_path)])
    assert "--data-root applies to Omniglot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(checkpoints["avg"]), "--data", "omniglot", "--data-root", str(tmp_path / "none")])
    assert "does not exist" in capsys.readouterr().err


def test_eval_paired_differences(tmp_path, checkpoints, capsys):
    out_json = tmp_path / "r.json"
    main([f"{checkpoints['gmm2']}", f"AVG-FT={checkpoints['avg']}", "--noise", "0", "--seeds", "3",
          "--compare-to", "AVG-FT", "--json", str(out_json), "--threads", "1"])
    assert "minus AVG-FT" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    rows = {r["label"]: r["noise"]["0.0"] for r in result["rows"]}
    (diff,) = result["paired"]
    cell = diff["noise"]["0.0"]
    # One run per label: paired by concept draw (the same concept sets for both models).
    want = [a - b for a, b in zip(rows["S2M-GMM2"]["raw"][0], rows["AVG-FT"]["raw"][0])]
    assert cell["paired"] == pytest.approx(want, abs=1e-15)
    assert cell["diff"] == pytest.approx(rows["S2M-GMM2"]["map"] - rows["AVG-FT"]["map"], abs=1e-12)
    assert cell["ci95"][0] <= cell["diff"] <= cell["ci95"][1]
    with pytest.raises(SystemExit):
        main([f"{checkpoints['avg']}", "--noise", "0", "--seeds", "1", "--compare-to", "S2M-Gauss"])
    assert "is not a row label" in capsys.readouterr().err


def test_sample_polysemous_concepts_and_their_ap():
    labels = torch.arange(6).repeat_interleave(7)
    g = torch.Generator().manual_seed(torch.initial_seed())
    concepts, partners = sample_polysemous_concepts(labels, 6, 1 / 3, g)
    assert concepts.shape == (6, 6) and partners.shape == (6,)
    for c in range(6):
        p = int(partners[c])
        assert p != c
        got = labels[concepts[c]].tolist()
        assert got[:2] == [c, c] and got[2:4] == [p, p], "c takes the larger half, then its partner"
        assert not {c, p} & set(got[4:]), "the noisy images are of neither class"
        assert len(set(concepts[c].tolist())) == 6
    # One-hot descriptors: the nearest-neighbour model of a two-class concept scores both
    # classes' remaining images 1 and the rest 0: AP 1 when both count as relevant. With the
    # partner ignored, its images tie with the class's own and, ties going to the lower
    # index, rank first for the last class (every partner of class 5 is a lower class).
    desc = torch.nn.functional.one_hot(labels, 6).double()
    clean, partners = sample_polysemous_concepts(labels, 4, 0.0, g)
    scores = retrieval_scores(NNScorer(), desc, clean)
    torch.testing.assert_close(retrieval_ap(scores, labels, clean, partners), torch.ones(6, dtype=torch.float64))
    assert retrieval_ap(scores, labels, clean)[5] < 1
    with pytest.raises(ValueError, match="needs >= 2 clean"):
        sample_polysemous_concepts(labels, 3, 0.5, g)


def test_eval_polysemy_by_hand(tmp_path, checkpoints, capsys):
    main([f"{checkpoints['avg']}", "--polysemy", "--noise", "0", "--seeds", "1", "--json", str(tmp_path / "r.json")])
    assert "two-class concept sets of 10" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["settings"]["polysemy"] is True
    from s2m_ext.data import make_glyphs
    from s2m_ext.data.base import mix_seed

    model = model_from_checkpoint(load_checkpoint(checkpoints["avg"])).eval()
    test = make_glyphs("test", 8, 20, 0)
    concepts, partners = sample_polysemous_concepts(test.labels, 10, 0.0, torch.Generator().manual_seed(mix_seed(0, 0, 31)))
    scores = retrieval_scores(model.scorer, embed_all(model, test.images), concepts)
    sklearn = pytest.importorskip("sklearn.metrics")
    aps = []
    for c in range(concepts.shape[0]):
        outside = torch.ones(len(test.labels), dtype=torch.bool)
        outside[concepts[c]] = False
        relevant = ((test.labels[outside] == c) | (test.labels[outside] == partners[c])).numpy()
        aps.append(sklearn.average_precision_score(relevant, scores[c, outside].double().numpy()))
    assert result["rows"][0]["noise"]["0.0"]["map"] == pytest.approx(sum(aps) / len(aps), abs=1e-12)


def test_eval_pl_checkpoint_with_every_baseline_and_the_svm_by_hand(tmp_path, checkpoints, capsys):
    out_json = tmp_path / "pl.json"
    code = main([f"{checkpoints['pl']}", f"AVG-FT={checkpoints['avg']}", "--scorers", "avg", "nn", "svm", "gauss",
                 "gmm2", "--noise", "0", "--seeds", "1", "--svm-negatives", "50", "--json", str(out_json),
                 "--threads", "1"])
    assert code == 0
    table = capsys.readouterr().out
    labels = ["PL-AVG", "PL-NN", "PL-SVM", "PL-Gauss", "PL-GMM2", "AVG-FT", "NN on AVG-FT", "SVM on AVG-FT",
              "Gauss on AVG-FT", "GMM2 on AVG-FT"]
    for label in labels:
        assert f"| {label} " in table
    result = json.loads(out_json.read_text())
    assert [r["label"] for r in result["rows"]] == labels
    for row in result["rows"]:
        assert 0.0 < row["noise"]["0.0"]["map"] <= 1.0
    # PL-SVM again by hand: 50 training images drawn by the documented seed are the negatives.
    from s2m_ext.data import make_glyphs
    from s2m_ext.data.base import mix_seed
    from s2m_ext.eval import NEGATIVES_SEED
    from s2m_ext.nn import SVMScorer

    model = model_from_checkpoint(load_checkpoint(checkpoints["pl"])).eval()
    train_data, test = make_glyphs("train", 20, 20, 0), make_glyphs("test", 8, 20, 0)
    picked = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(NEGATIVES_SEED))[:50]
    scorer = SVMScorer(embed_all(model, train_data.images[picked]))
    concepts = sample_concepts(test.labels, 10, 0.0, torch.Generator().manual_seed(mix_seed(0, 0)))
    ap = retrieval_ap(retrieval_scores(scorer, embed_all(model, test.images), concepts), test.labels, concepts)
    assert result["rows"][2]["noise"]["0.0"]["map"] == pytest.approx(float(ap.mean()), abs=1e-12)


def test_eval_fewshot_takes_the_svm_scorer(tmp_path, checkpoints, capsys):
    code = main([f"{checkpoints['pl']}", "--scorers", "svm", "--fewshot", "--ways", "2", "--shots", "1",
                 "--episodes", "2", "--queries-per-class", "2", "--svm-negatives", "30", "--threads", "1",
                 "--json", str(tmp_path / "f.json")])
    assert code == 0 and "PL-SVM" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "f.json").read_text())["fewshot"]
    assert row["label"] == "PL-SVM" and all(0.0 <= a <= 1.0 for a in row["settings"]["2-way 1-shot"]["raw"][0])
