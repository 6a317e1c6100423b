"""s2m-eval: the paper's protocols for trained checkpoints, scorers side by side: retrieval
(the default) and few-shot classification (``--fewshot``, see :mod:`s2m_ext.nn.fewshot`).

    s2m-eval runs/gauss/last.pt runs/avg/last.pt --noise 0 0.3 --json r.json --png r.png
    s2m-eval S2M-Gauss=runs/g0/last.pt,runs/g1/last.pt AVG-FT=runs/a0/last.pt,runs/a1/last.pt
    s2m-eval runs/avg/last.pt --scorers avg nn gauss gmm2      # every scorer on one embedding
    s2m-eval runs/gauss/last.pt --fewshot --ways 5 20 --shots 1 5 --episodes 100

For every test class, a concept set of ``--concept-size`` of its images (with
``round(noise * n)`` of them replaced by images of other test classes) is fitted by the
scorer and all other test images are ranked; the relevant ones are the remaining images
of the class. AP per class, mAP over classes. Each mAP is repeated over ``--seeds``
concept-set draws (the same draws for every model) and, when a label groups several
checkpoints (training seeds), over those runs; the 95% confidence interval is a Student t
interval over the runs when there are several, else over the concept-set draws.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ._extras import require
from .data import load_splits
from .data.base import ClassImages, mix_seed
from .data.sources import DATA_SOURCES, data_config
from .nn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .nn.fewshot import episode_accuracy
from .nn.retrieval import embed_all, retrieval_ap, retrieval_scores, sample_concepts, sample_polysemous_concepts
from .nn.scorers import EVAL_SCORER_NAMES, MIXTURE_DEFAULTS, SVM_DEFAULTS, display_name, make_scorer, short_name
from .train import check_device, check_threads, default_threads

__all__ = ["evaluate", "evaluate_fewshot", "main", "confidence_interval", "svm_negatives"]


@dataclass
class Group:
    """Checkpoints of one model (e.g. several training seeds) under one label."""

    label: str
    paths: List[str]
    payloads: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def scorer(self) -> str:
        return self.payloads[0]["model"]["scorer"]

    @property
    def pretrained(self) -> bool:
        """A PL embedding (trained as a softmax classifier, ``s2m-train --objective classify``)."""
        return self.payloads[0]["model"].get("objective", "histogram") == "classify"


def confidence_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """Student t interval (mean - h, mean + h) of the mean; (mean, mean) for one value."""
    stats = require("scipy.stats", "train", "confidence intervals")

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def parse_groups(specs: Sequence[str]) -> List[Group]:
    """``[LABEL=]PATH[,PATH...]`` -> groups (label filled in later from the scorer)."""
    groups = []
    for spec in specs:
        label, sep, paths = spec.partition("=")
        if not sep:
            label, paths = "", spec
        parts = [p for p in paths.split(",") if p]
        if not parts:
            raise ValueError(f"no checkpoint path in {spec!r}")
        groups.append(Group(label, parts))
    return groups


def load_groups(groups: List[Group]) -> None:
    """Load every checkpoint (clear errors for bad paths and foreign files) and check that
    the checkpoints of one group describe the same model."""
    for group in groups:
        group.payloads = [load_checkpoint(p) for p in group.paths]
        specs = {json.dumps(p["model"], sort_keys=True) for p in group.payloads}
        if len(specs) > 1:
            raise CheckpointError(f"the checkpoints of {group.label or group.paths[0]!r} describe different models: {sorted(specs)}")
        if not group.label:
            group.label = "PL" if group.pretrained else display_name(group.scorer)
    labels = [g.label for g in groups]
    for label in set(labels):
        if labels.count(label) > 1:
            raise ValueError(f"two groups are labelled {label!r}: name them LABEL=PATH[,PATH...]")


def resolve_data(groups: List[Group], data: Optional[str], data_root: Optional[str], test_classes: Optional[int]) -> Dict[str, Any]:
    """The data description to evaluate on: the checkpoints' own (which must agree), with
    ``--data`` / ``--data-root`` / ``--test-classes`` overriding."""
    if data is not None:
        cfg = data_config(data, root=data_root)
    else:
        specs = {json.dumps(p["data"], sort_keys=True) for g in groups for p in g.payloads}
        if len(specs) > 1:
            raise ValueError("the checkpoints were trained on different data; pass --data (and --data-root) to evaluate them on one set")
        cfg = dict(groups[0].payloads[0]["data"])
        if data_root is not None:
            if cfg["source"] != "omniglot":
                raise ValueError("--data-root applies to Omniglot; add --data omniglot to evaluate glyph-trained models on it")
            cfg["root"] = data_root
    if test_classes is not None:
        if cfg["source"] != "glyphs":
            raise ValueError("--test-classes applies to the glyph data only")
        cfg["test_classes"] = test_classes
    return cfg


def evaluate(
    groups: List[Group],
    test: ClassImages,
    scorers: Sequence[str] = ("own",),
    noise: Sequence[float] = (0.0, 0.3),
    concept_size: int = 10,
    seeds: int = 5,
    n_iter: Optional[int] = None,
    var_floor: Optional[float] = None,
    device: str = "cpu",
    polysemy: bool = False,
    negatives: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """mAP of every (group, scorer) at every noise level; see the module docstring. With
    ``polysemy`` every concept set is drawn from two classes, both relevant
    (:func:`~s2m_ext.nn.retrieval.sample_polysemous_concepts`). The ``svm`` scorer needs
    ``negatives``: the training images (M, C, H, W) used as negatives (:func:`svm_negatives`).

    Returns ``{"rows": [...], "example": {...}}``: a row per (group, scorer) with, per noise
    level, the mean, the 95% interval, what it is over, and the raw mAPs [run][seed]."""
    rows: List[Dict[str, Any]] = []
    example = None
    def draw(s: int, nz: float):
        gen = torch.Generator().manual_seed(mix_seed(s, round(nz * 1000), *((31,) if polysemy else ())))
        if polysemy:
            return sample_polysemous_concepts(test.labels, concept_size, nz, gen)
        return sample_concepts(test.labels, concept_size, nz, gen), None

    concept_sets = {(s, nz): draw(s, nz) for s in range(seeds) for nz in noise}
    for group in groups:
        names = _scorer_names(group, scorers)
        per_row = {name: {nz: [] for nz in noise} for name in names}
        for run, payload in enumerate(group.payloads):
            desc = _embed(payload, test.images, device)
            for name in names:
                scorer = _scorer(name, payload, n_iter, var_floor, negatives, device)
                for nz in noise:
                    maps = []
                    for s in range(seeds):
                        concepts, partners = concept_sets[(s, nz)]
                        gen = torch.Generator().manual_seed(mix_seed(s, 17))
                        scores = retrieval_scores(scorer, desc, concepts.to(desc.device), gen).cpu()
                        ap = retrieval_ap(scores, test.labels, concepts, partners)
                        maps.append(float(ap.mean()))
                        if example is None and run == 0 and s == 0 and nz == max(noise):
                            example = _example(group.label, name, scores, ap, test, concepts, nz, partners)
                    per_row[name][nz].append(maps)
        for name in names:
            cells = {str(nz): _summary(per_row[name][nz], "map", "concept-set draws") for nz in noise}
            rows.append({"label": _row_label(group, name), "checkpoints": group.paths, "scorer": name,
                         "trained_with": group.scorer, "noise": cells})
    return {"rows": rows, "example": example}


def _embed(payload: Dict[str, Any], images: torch.Tensor, device: str) -> torch.Tensor:
    """Descriptors (M, D) of images (M, C, H, W) under a checkpoint's embedding."""
    model = model_from_checkpoint(payload).to(device).eval()
    return embed_all(model, images, dtype=next(model.parameters()).dtype)


#: Seed of the draw of the SVM's negatives (the same training images for every checkpoint).
NEGATIVES_SEED = 41


def svm_negatives(train: ClassImages, n_negatives: int = SVM_DEFAULTS.n_negatives) -> torch.Tensor:
    """The SVM's negatives: ``n_negatives`` training images drawn without replacement by a
    fixed seed (:data:`NEGATIVES_SEED`), the same for every checkpoint of that data. The
    training classes are disjoint from the validation and test classes, so every negative is
    of another class than any concept set evaluated. Returns the images (n_negatives, C, H, W)."""
    if isinstance(n_negatives, bool) or not isinstance(n_negatives, int) or not 1 <= n_negatives <= len(train):
        raise ValueError(f"--svm-negatives must be an int in [1, {len(train)}] (the training images), got {n_negatives!r}")
    gen = torch.Generator().manual_seed(NEGATIVES_SEED)
    picked = torch.randperm(len(train), generator=gen)[:n_negatives]
    return train.images[picked]


def _scorer(name: str, payload: Dict[str, Any], n_iter: Optional[int], var_floor: Optional[float],
            negatives: Optional[torch.Tensor] = None, device: str = "cpu"):
    """Scorer ``name`` with the checkpoint's mixture settings unless overridden; ``svm`` gets
    the descriptors of ``negatives`` under the checkpoint's embedding."""
    spec = payload["model"]
    neg_desc = None
    if name == "svm":
        if negatives is None:
            raise ValueError("the svm scorer needs negatives: the training images of the checkpoints' data")
        neg_desc = _embed(payload, negatives, device)
    return make_scorer(
        name,
        n_iter=spec.get("n_iter", MIXTURE_DEFAULTS.n_iter) if n_iter is None else n_iter,
        var_floor=spec.get("var_floor", MIXTURE_DEFAULTS.var_floor) if var_floor is None else var_floor,
        tol=spec.get("tol", MIXTURE_DEFAULTS.tol),
        negatives=neg_desc,
    )


def _scorer_names(group: Group, scorers: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(group.scorer if s == "own" else s for s in scorers))  # keep order, drop repeats


def _row_label(group: Group, name: str) -> str:
    """FT groups: the label for the scorer trained with, "<Scorer> on <label>" otherwise; PL
    groups (one pre-learned embedding, no scorer of its own): "<label>-<Scorer>", e.g. PL-SVM."""
    if group.pretrained:
        return f"{group.label}-{short_name(name)}"
    if name == group.scorer:
        return group.label
    return f"{display_name(name).split('-FT')[0].replace('S2M-', '')} on {group.label}"


def _summary(raw: List[List[float]], key: str, draws: str) -> Dict[str, Any]:
    """Mean and 95% interval of ``raw`` [run][draw]: over the runs' means when there are
    several runs (training seeds), else over the draws of the one run."""
    over_runs = len(raw) > 1
    values = [sum(m) / len(m) for m in raw] if over_runs else raw[0]
    lo, hi = confidence_interval(values)
    return {key: sum(values) / len(values), "ci95": [lo, hi],
            "ci_over": f"{len(raw)} training runs" if over_runs else f"{len(values)} {draws}", "raw": raw}


def fewshot_setting(ways: int, shots: int) -> str:
    return f"{ways}-way {shots}-shot"


def evaluate_fewshot(
    groups: List[Group],
    test: ClassImages,
    scorers: Sequence[str] = ("own",),
    ways: Sequence[int] = (5, 20),
    shots: Sequence[int] = (1, 5),
    episodes: int = 100,
    queries_per_class: int = 5,
    n_iter: Optional[int] = None,
    var_floor: Optional[float] = None,
    device: str = "cpu",
    negatives: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Few-shot classification accuracy (:mod:`s2m_ext.nn.fewshot`) of every (group, scorer)
    in every N-way K-shot setting, over ``episodes`` episodes drawn from the test classes
    (the same episodes for every model). ``negatives``: as in :func:`evaluate`.

    Returns ``{"fewshot": [...]}``: a row per (group, scorer) with, per setting
    (``"5-way 1-shot"``, ...), the mean accuracy, its 95% interval, what it is over and the
    raw accuracies [run][episode]."""
    rows: List[Dict[str, Any]] = []
    settings = [(n, k) for n in ways for k in shots]
    for group in groups:
        names = _scorer_names(group, scorers)
        per_row = {name: {st: [] for st in settings} for name in names}
        for payload in group.payloads:
            desc = _embed(payload, test.images, device)
            for name in names:
                scorer = _scorer(name, payload, n_iter, var_floor, negatives, device)
                for n, k in settings:
                    per_row[name][(n, k)].append([
                        episode_accuracy(scorer, desc, test.labels, n, k, queries_per_class,
                                         torch.Generator().manual_seed(mix_seed(e, n, k, 29)))
                        for e in range(episodes)
                    ])
        for name in names:
            cells = {fewshot_setting(n, k): _summary(per_row[name][(n, k)], "accuracy", "episodes") for n, k in settings}
            rows.append({"label": _row_label(group, name), "checkpoints": group.paths, "scorer": name,
                         "trained_with": group.scorer, "settings": cells})
    return {"fewshot": rows}


def format_fewshot_table(result: Dict[str, Any]) -> str:
    settings = list(result["fewshot"][0]["settings"])
    return _interval_table([(row["label"], [row["settings"][st] for st in settings]) for row in result["fewshot"]],
                           [f"accuracy, {st}" for st in settings], "accuracy")


def _example(label: str, scorer: str, scores: torch.Tensor, ap: torch.Tensor, test: ClassImages, concepts: torch.Tensor,
             noise: float, partners: Optional[torch.Tensor] = None, top: int = 20):
    """A retrieval example for the figure: the concept set of the class with the median AP
    (a typical case) and its top-ranked items."""
    c = int(torch.argsort(ap)[len(ap) // 2])
    ranked = scores[c].clone()
    ranked[concepts[c]] = -math.inf
    order = torch.argsort(ranked, descending=True)[:top]
    relevant = [c] if partners is None else [c, int(partners[c])]
    is_relevant = lambda idx: torch.isin(test.labels[idx], torch.tensor(relevant)).tolist()  # noqa: E731
    return {
        "label": label,
        "scorer": scorer,
        "noise": noise,
        "class": " + ".join(test.class_names[r] for r in relevant),
        "ap": float(ap[c]),
        "concept": concepts[c].tolist(),
        "concept_relevant": is_relevant(concepts[c]),
        "top": order.tolist(),
        "top_relevant": is_relevant(order),
    }


def paired_differences(result: Dict[str, Any], reference: str, noise: Sequence[float]) -> List[Dict[str, Any]]:
    """mAP of every row minus that of row ``reference``, paired: run i of a group against
    run i of the reference (runs trained with the same --seed share initial weights and
    episodes) and draw s against draw s (the same concept sets). With several runs the
    interval is over the per-run differences, else over the per-draw ones."""
    rows = {row["label"]: row for row in result["rows"]}
    if reference not in rows:
        raise ValueError(f"--compare-to {reference!r} is not a row label; the rows are {list(rows)}")
    out = []
    for row in result["rows"]:
        if row["label"] == reference:
            continue
        cells = {}
        for nz in noise:
            a, b = row["noise"][str(nz)]["raw"], rows[reference]["noise"][str(nz)]["raw"]
            if len(a) != len(b):
                raise ValueError(f"cannot pair {row['label']!r} ({len(a)} runs) with {reference!r} ({len(b)} runs)")
            if len(a) > 1:
                diffs = [sum(x) / len(x) - sum(y) / len(y) for x, y in zip(a, b)]
            else:
                diffs = [x - y for x, y in zip(a[0], b[0])]
            lo, hi = confidence_interval(diffs)
            cells[str(nz)] = {"diff": sum(diffs) / len(diffs), "ci95": [lo, hi], "paired": diffs}
        out.append({"label": row["label"], "reference": reference, "noise": cells})
    return out


def _markdown(lines: List[List[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def format_differences(diffs: List[Dict[str, Any]], noise: Sequence[float]) -> str:
    lines = [[f"minus {diffs[0]['reference']}" if diffs else "model"] + [f"paired diff, noise {nz:g}" for nz in noise]]
    for row in diffs:
        cells = [row["label"]]
        for nz in noise:
            cell = row["noise"][str(nz)]
            cells.append(f"{cell['diff']:+.3f} [{cell['ci95'][0]:+.3f}, {cell['ci95'][1]:+.3f}]")
        lines.append(cells)
    return _markdown(lines)


def _interval_table(rows: List[Tuple[str, List[Dict[str, Any]]]], columns: List[str], key: str) -> str:
    """Markdown table of ``cell[key] [ci95]`` per row (label, one cell per column)."""
    lines = [["model"] + columns]
    for label, cells in rows:
        lines.append([label] + [f"{c[key]:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]" for c in cells])
    return _markdown(lines)


def format_table(result: Dict[str, Any], noise: Sequence[float]) -> str:
    return _interval_table([(row["label"], [row["noise"][str(nz)] for nz in noise]) for row in result["rows"]],
                           [f"mAP, noise {nz:g}" for nz in noise], "map")


def _interval_bars(ax, rows: List[Tuple[str, List[Dict[str, Any]]]], columns: List[str], key: str) -> None:
    """Grouped bars with 95% intervals: per row (label, one cell per column), cell[key] and
    cell["ci95"]."""
    width = 0.8 / max(1, len(rows))
    for i, (label, cells) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(columns))]
        means = [c[key] for c in cells]
        errs = [[m - c["ci95"][0] for m, c in zip(means, cells)], [c["ci95"][1] - m for m, c in zip(means, cells)]]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(columns)), columns)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, 1)


def write_fewshot_figure(result: Dict[str, Any], path: str) -> None:
    """Accuracy per N-way K-shot setting (bars, 95% intervals), a bar per model."""
    matplotlib = require("matplotlib", "train", "the figure (--png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["fewshot"]
    settings = list(rows[0]["settings"])
    fig, ax = plt.subplots(figsize=(2.5 + 1.5 * len(settings), 4))
    _interval_bars(ax, [(row["label"], [row["settings"][st] for st in settings]) for row in rows], settings, "accuracy")
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_title("few-shot classification on held-out classes")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figure(result: Dict[str, Any], test: ClassImages, noise: Sequence[float], path: str) -> None:
    """mAP per model and noise level (bars, 95% intervals) and a retrieval example."""
    matplotlib = require("matplotlib", "train", "the figure (--png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ex = result["example"]
    fig = plt.figure(figsize=(13, 5.2))
    grid = fig.add_gridspec(3, 2, width_ratios=[1.0, 1.3])
    ax = fig.add_subplot(grid[:, 0])
    _interval_bars(ax, [(row["label"], [row["noise"][str(nz)] for nz in noise]) for row in result["rows"]],
                   [f"noise {nz:g}" for nz in noise], "map")
    ax.set_ylabel("mAP (95% interval)")
    ax.set_title("retrieval mAP on held-out classes")

    def strip(axis, indices, relevant, title):
        imgs = test.images[torch.tensor(indices)][:, 0].float() / 255.0
        n = len(indices)
        canvas = torch.ones(imgs.shape[1] + 4, n * (imgs.shape[2] + 4))
        for k in range(n):
            x0 = k * (imgs.shape[2] + 4) + 2
            canvas[2 : 2 + imgs.shape[1], x0 : x0 + imgs.shape[2]] = 1 - imgs[k]
        axis.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1)
        for k, ok in enumerate(relevant):
            axis.add_patch(Rectangle((k * (imgs.shape[2] + 4) + 0.5, 0.5), imgs.shape[2] + 2, imgs.shape[1] + 2,
                                     fill=False, lw=1.5, edgecolor="tab:green" if ok else "tab:red"))
        axis.set_title(title, fontsize=9)
        axis.axis("off")

    if ex is not None:
        half = len(ex["top"]) // 2
        strip(fig.add_subplot(grid[0, 1]), ex["concept"], ex["concept_relevant"],
              f"concept set of {ex['class']} (noise {ex['noise']:g}; red = other class; median-AP class)")
        strip(fig.add_subplot(grid[1, 1]), ex["top"][:half], ex["top_relevant"][:half],
              f"top {len(ex['top'])} by {ex['label']} (green = relevant; AP {ex['ap']:.2f})")
        strip(fig.add_subplot(grid[2, 1]), ex["top"][half:], ex["top_relevant"][half:], "")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="s2m-eval",
        description="Retrieval mAP (or, with --fewshot, few-shot accuracy) of s2m-train checkpoints on held-out classes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CKPT[,CKPT...]",
                   help="checkpoints; comma-joined ones (training seeds) are pooled under one label")
    p.add_argument("--scorers", nargs="+", default=["own"],
                   help="scorers to apply to each embedding: 'own' (the one it was trained with) and/or "
                        f"{', '.join(EVAL_SCORER_NAMES)} (svm: one-vs-rest linear SVM, negatives from the training images)")
    p.add_argument("--svm-negatives", type=int, default=SVM_DEFAULTS.n_negatives,
                   help="svm: random training images used as the negatives of every concept set")
    p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.3], help="concept-set noise levels")
    p.add_argument("--concept-size", type=int, default=10, help="concept set size n")
    p.add_argument("--seeds", type=int, default=5, help="concept-set draws per model")
    p.add_argument("--data", choices=DATA_SOURCES, default=None, help="evaluate on this source instead of the checkpoints' own")
    p.add_argument("--data-root", default=None, help="Omniglot folder or zip")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split to rank")
    p.add_argument("--test-classes", type=int, default=None, help="glyph test classes (default: the checkpoint's)")
    p.add_argument("--n-iter", type=int, default=None, help="EM iterations (default: the checkpoint's)")
    p.add_argument("--var-floor", type=float, default=None, help="variance floor (default: the checkpoint's)")
    p.add_argument("--compare-to", default=None, metavar="LABEL",
                   help="also print every row's mAP minus this row's, paired by run (training seed) and concept draw")
    p.add_argument("--polysemy", action="store_true",
                   help="two-class concept sets: each class with a random partner class, both relevant")
    p.add_argument("--fewshot", action="store_true",
                   help="few-shot classification (N-way K-shot episodes) instead of retrieval")
    p.add_argument("--ways", nargs="+", type=int, default=[5, 20], help="--fewshot: classes per episode")
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5], help="--fewshot: support images per class")
    p.add_argument("--episodes", type=int, default=100, help="--fewshot: episodes per setting and model")
    p.add_argument("--queries-per-class", type=int, default=5, help="--fewshot: query images per class and episode")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="write the figure here")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: the idle cores, at least 1)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_device(args.device)
        check_threads(args.threads)
        if args.var_floor is not None and not (math.isfinite(args.var_floor) and 0 <= args.var_floor <= torch.finfo(torch.float32).max):
            raise ValueError(f"--var-floor must be a finite number in [0, 3.4e38] (the float32 range), got {args.var_floor}")
    except ValueError as exc:
        parser.error(str(exc))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        return _run(parser, args)
    finally:
        torch.set_num_threads(threads_before)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    for s in args.scorers:
        if s != "own" and s not in EVAL_SCORER_NAMES:
            parser.error(f"--scorers: unknown scorer {s!r}; expected 'own' or one of {', '.join(EVAL_SCORER_NAMES)}")
    if args.svm_negatives < 1:
        parser.error(f"--svm-negatives must be >= 1, got {args.svm_negatives}")
    if args.seeds < 1 or args.concept_size < 1:
        parser.error("--seeds and --concept-size must be >= 1")
    for flag in ("ways", "shots"):
        if min(getattr(args, flag)) < 1:
            parser.error(f"--{flag} must be >= 1")
    if args.episodes < 1 or args.queries_per_class < 1:
        parser.error("--episodes and --queries-per-class must be >= 1")
    try:
        groups = parse_groups(args.checkpoints)
        load_groups(groups)
        data_cfg = resolve_data(groups, args.data, args.data_root, args.test_classes)
        test = load_splits(data_cfg, which=(args.split,))[args.split]
        negatives = None
        if "svm" in args.scorers:
            negatives = svm_negatives(load_splits(data_cfg, which=("train",))["train"], args.svm_negatives)
        if args.fewshot:
            return _run_fewshot(args, groups, test, data_cfg, negatives)
        result = evaluate(groups, test, args.scorers, args.noise, args.concept_size, args.seeds,
                          args.n_iter, args.var_floor, args.device, polysemy=args.polysemy, negatives=negatives)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError is a ValueError
        parser.exit(2, f"s2m-eval: error: {exc}\n")
    result["settings"] = {
        "data": data_cfg, "split": args.split, "n_classes": test.n_classes, "n_images": len(test),
        "concept_size": args.concept_size, "seeds": args.seeds, "noise": args.noise, "polysemy": args.polysemy,
    }
    kind = "two-class concept sets" if args.polysemy else "concept sets"
    print(f"{args.split} split: {test.n_classes} classes, {len(test)} images; {kind} of {args.concept_size}; "
          f"{args.seeds} draws per model")
    print(format_table(result, args.noise))
    if args.compare_to:
        try:
            result["paired"] = paired_differences(result, args.compare_to, args.noise)
        except ValueError as exc:
            parser.exit(2, f"s2m-eval: error: {exc}\n")
        print(format_differences(result["paired"], args.noise))
    _write_outputs(args, result, lambda path: write_figure(result, test, args.noise, path))
    return 0


def _run_fewshot(args: argparse.Namespace, groups: List[Group], test: ClassImages, data_cfg: Dict[str, Any],
                 negatives: Optional[torch.Tensor]) -> int:
    result = evaluate_fewshot(groups, test, args.scorers, args.ways, args.shots, args.episodes, args.queries_per_class,
                              args.n_iter, args.var_floor, args.device, negatives)
    result["settings"] = {
        "data": data_cfg, "split": args.split, "n_classes": test.n_classes, "n_images": len(test),
        "ways": args.ways, "shots": args.shots, "episodes": args.episodes, "queries_per_class": args.queries_per_class,
    }
    print(f"{args.split} split: {test.n_classes} classes, {len(test)} images; {args.episodes} episodes per setting, "
          f"{args.queries_per_class} queries per class")
    print(format_fewshot_table(result))
    _write_outputs(args, result, lambda path: write_fewshot_figure(result, path))
    return 0


def _write_outputs(args: argparse.Namespace, result: Dict[str, Any], figure) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.png:
        figure(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    sys.exit(main())
