"""Few-shot classification (s2m_ext.nn.fewshot) and s2m-eval --fewshot."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval import checkpoints  # noqa: F401  (the module's trained runs)

from s2m_ext.eval import main
from s2m_ext.nn import make_scorer
from s2m_ext.nn.checkpoint import load_checkpoint, model_from_checkpoint
from s2m_ext.nn.fewshot import classify, episode_accuracy, sample_episode
from s2m_ext.nn.retrieval import embed_all

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["gauss", "avg", "nn"])
def test_classify_is_the_argmax_of_each_class_fitted_alone(name):
    """Classes with different support counts (the padded, masked path) give the decision of
    fitting every class's support on its own and scoring the queries under each."""
    g = torch.Generator().manual_seed(torch.initial_seed())
    D = 4
    labels = torch.tensor([7, 2, 7, 9, 2, 7, 9, 9, 9])  # 3, 2 and 4 items; labels not 0..C-1
    support = torch.randn(len(labels), D, generator=g, dtype=torch.float64)
    queries = torch.randn(11, D, generator=g, dtype=torch.float64)
    scorer = make_scorer(name)
    predicted = classify(scorer, support, labels, queries)
    classes = [2, 7, 9]
    scores = torch.stack([scorer.score_pool(scorer.fit(support[labels == c][None]), queries)[0] for c in classes])
    want = torch.tensor(classes)[scores.argmax(0)]
    assert torch.equal(predicted, want)


def test_classify_separated_clusters_by_hand():
    # Unit descriptors (as the embeddings give) in three tight clusters around the axes;
    # each query sits next to one of them.
    centres = torch.eye(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize
    support = unit(centres.repeat_interleave(3, 0) + 0.05 * torch.randn(9, 3, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    queries = unit(centres[[2, 0, 1, 1]] + 0.05, dim=1)
    for name in ("gauss", "gmm2", "avg", "nn"):
        assert classify(make_scorer(name), support, labels, queries, torch.Generator().manual_seed(1)).tolist() == [2, 0, 1, 1]


def test_classify_refuses_bad_inputs():
    scorer = make_scorer("gauss")
    with pytest.raises(ValueError, match="support_labels"):
        classify(scorer, torch.zeros(3, 2), torch.zeros(3, dtype=torch.int32), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="support and queries"):
        classify(scorer, torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), torch.zeros(1, 3))


def test_sample_episode_draws_distinct_classes_and_disjoint_items():
    labels = torch.arange(12).repeat_interleave(torch.tensor([8, 3, 8, 8, 9, 8, 2, 8, 8, 10, 8, 8]))
    g = torch.Generator().manual_seed(torch.initial_seed())
    for _ in range(20):
        support, query, truth = sample_episode(labels, 5, 2, 4, g)
        assert support.shape == (10,) and query.shape == (20,)
        classes = labels[support].reshape(5, 2)
        assert (classes == classes[:, :1]).all(), "support is class-major, shots per class"
        assert len(set(classes[:, 0].tolist())) == 5, "the ways are distinct classes"
        assert not {1, 6} & set(classes[:, 0].tolist()), "classes with too few items are not drawn"
        assert torch.equal(truth, labels[query]) and torch.equal(truth.reshape(5, 4)[:, 0], classes[:, 0])
        assert not set(support.tolist()) & set(query.tolist()) and len(set(query.tolist())) == 20
    with pytest.raises(ValueError, match="needs 11 classes"):
        sample_episode(labels, 11, 2, 4, g)


def test_eval_fewshot_json_figure_and_by_hand(tmp_path, checkpoints, capsys):  # noqa: F811
    out_json, out_png = tmp_path / "f.json", tmp_path / "f.png"
    code = main([f"{checkpoints['gmm2']}", f"AVG-FT={checkpoints['avg']}", "--fewshot", "--ways", "2", "5",
                 "--shots", "1", "3", "--episodes", "3", "--queries-per-class", "4", "--threads", "1",
                 "--json", str(out_json), "--png", str(out_png)])
    assert code == 0
    table = capsys.readouterr().out
    for text in ("S2M-GMM2", "AVG-FT", "accuracy, 5-way 3-shot"):
        assert text in table
    result = json.loads(out_json.read_text())
    rows = result["fewshot"]
    assert [r["label"] for r in rows] == ["S2M-GMM2", "AVG-FT"]
    for row in rows:
        assert list(row["settings"]) == ["2-way 1-shot", "2-way 3-shot", "5-way 1-shot", "5-way 3-shot"]
        for cell in row["settings"].values():
            assert len(cell["raw"][0]) == 3 and cell["ci_over"] == "3 episodes"
            assert all(0.0 <= a <= 1.0 for a in cell["raw"][0])
            assert cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1]
    assert out_png.stat().st_size > 5_000
    # The AVG-FT row again, episode by episode, from the documented seeds.
    from s2m_ext.data import make_glyphs
    from s2m_ext.data.base import mix_seed

    model = model_from_checkpoint(load_checkpoint(checkpoints["avg"])).eval()
    test = make_glyphs("test", 8, 20, 0)
    desc = embed_all(model, test.images)
    want = [episode_accuracy(model.scorer, desc, test.labels, 5, 3, 4, torch.Generator().manual_seed(mix_seed(e, 5, 3, 29)))
            for e in range(3)]
    assert rows[1]["settings"]["5-way 3-shot"]["raw"][0] == want


def test_eval_fewshot_refuses_bad_settings(tmp_path, checkpoints, capsys):  # noqa: F811
    for flags, match in ((["--ways", "0"], "--ways must be >= 1"), (["--episodes", "0"], "--episodes"),
                         (["--ways", "9"], "needs 9 classes")):
        with pytest.raises(SystemExit) as exc:
            main([f"{checkpoints['avg']}", "--fewshot", *flags])
        assert exc.value.code == 2
        assert match in capsys.readouterr().err
