"""s2m-train: meta-train an embedding CNN with a Set2Model or baseline scorer.

    s2m-train --data glyphs --scorer gauss --steps 2000 --out runs/gauss
    s2m-train --data omniglot --data-root PATH --scorer gmm2 --noise 0.3 --out runs/gmm2
    s2m-train --out runs/gauss --resume              # continue a killed run
    torchrun --nproc_per_node=2 -m s2m_ext.train ...   # data-parallel (gloo on CPU, nccl on GPU)

Each step draws ``--tuples`` (concept, relevant, irrelevant) tuples (the global batch; a
data-parallel run gives each rank an equal share), scores the relevant and irrelevant
images against the model fitted to the concept set and minimises the histogram loss.
Tuples are a pure function of (seed, step, index) and the model's random initialisations
are seeded per tuple, so a run is repeatable, a resumed run continues exactly, and P
processes compute the same steps as one (up to the order of floating-point sums).

With ``--objective classify`` the embedding is pre-learned (PL) instead: each step draws
``tuples * (concept-size + n-relevant + n-irrelevant)`` training images (as many as the
tuples hold; a pure function of (seed, step, index) too) and minimises the softmax
cross-entropy of a linear head over the training classes on the embedding's output. The
head lives in the checkpoint (for resuming) but not in the model: s2m-eval applies the
AVG, NN, SVM and S2M scorers to the PL descriptors as they are (rows PL-AVG, PL-NN, ...).
``--scorer`` then only picks the scorer of the validation mAP.

Checkpoints (``<out>/last.pt``) are written every ``--checkpoint-minutes`` and at the end;
``<out>/best.pt`` keeps the weights with the best validation mAP; ``<out>/log.jsonl``
records the loss and validation mAP.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch._dynamo  # noqa: F401  (see below)
import torch.distributed as dist

from ._extras import require
from .data import EpisodeSampler, load_splits
from .data.base import mix_seed
from .data.sources import DATA_SOURCES, data_config
from .gmm import ConvergenceWarning
from .implicit import SOLVERS, ImplicitGradientWarning
from .nn import HistogramLoss, WarmStartCache, model_from_spec
from .nn.checkpoint import load_checkpoint, save_checkpoint
from .nn.retrieval import embed_all, retrieval_ap, retrieval_scores, sample_concepts
from .nn.scorers import BACKWARDS, MIXTURE_DEFAULTS, SCORER_NAMES

__all__ = ["TrainConfig", "train", "main", "validation_map", "OBJECTIVES", "Classifier", "classify_batch"]


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``s2m-train --help`` for each field)."""

    # data
    data: str = "glyphs"
    data_root: Optional[str] = None
    split_by: str = "character"
    train_classes: int = 1000
    val_classes: int = 100
    test_classes: int = 200
    per_class: int = 20
    data_seed: int = 0
    # episodes
    tuples: int = 5
    concept_size: int = 10
    n_relevant: int = 10
    n_irrelevant: int = 10
    noise: float = 0.0
    polysemy: float = 0.0
    # model
    objective: str = "histogram"
    scorer: str = "gauss"
    dim: int = 64
    width: int = 64
    depth: int = 4
    n_iter: int = MIXTURE_DEFAULTS.n_iter
    var_floor: float = MIXTURE_DEFAULTS.var_floor
    tol: float = MIXTURE_DEFAULTS.tol
    backward: str = MIXTURE_DEFAULTS.backward
    implicit_solver: str = MIXTURE_DEFAULTS.implicit_solver
    bins: int = 100
    dtype: str = "float32"
    init_from: Optional[str] = None
    warm_start: bool = False
    warm_var_floor: float = 1e-6
    # optimisation
    steps: int = 2000
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    # bookkeeping (may change when a run is resumed)
    out: str = "runs/s2m"
    resume: Optional[str] = None
    checkpoint_minutes: float = 5.0
    checkpoint_every: int = 0
    val_every: int = 200
    val_seed: int = 0
    device: str = "auto"
    threads: int = 0
    progress: bool = True


#: Fields a resumed run may change; every other field must match the checkpoint.
RUNTIME_FIELDS = {
    "steps", "out", "resume", "checkpoint_minutes", "checkpoint_every", "val_every",
    "device", "threads", "progress", "data_root",
}


#: Training objectives: the histogram loss of the scorer's scores (FT, end to end) or the
#: softmax cross-entropy of a classifier of the training classes (PL).
OBJECTIVES = ("histogram", "classify")


def model_spec(cfg: TrainConfig) -> Dict[str, Any]:
    spec = {"objective": cfg.objective} if cfg.objective != "histogram" else {}
    return {
        **spec,
        "scorer": cfg.scorer,
        "embedding": {"in_channels": 1, "dim": cfg.dim, "width": cfg.width, "depth": cfg.depth},
        "n_iter": cfg.n_iter,
        "var_floor": cfg.var_floor,
        "tol": cfg.tol,
        "backward": cfg.backward,
        "implicit_solver": cfg.implicit_solver,
    }


def data_spec(cfg: TrainConfig) -> Dict[str, Any]:
    if cfg.data == "glyphs":
        return data_config("glyphs", seed=cfg.data_seed, train_classes=cfg.train_classes, val_classes=cfg.val_classes,
                           test_classes=cfg.test_classes, per_class=cfg.per_class)
    return data_config("omniglot", root=cfg.data_root, seed=cfg.data_seed, split_by=cfg.split_by)


def check_device(device: str) -> None:
    """A usable --device: cpu, cuda or cuda:N of this machine (ValueError otherwise)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch has no usable CUDA device")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def check_threads(threads: Optional[int]) -> None:
    if threads is not None and threads < 0:
        raise ValueError(f"--threads must be >= 1 (or 0 / omitted for the default), got {threads}")


def _check_config(cfg: TrainConfig) -> None:
    if cfg.device != "auto":
        check_device(cfg.device)
    check_threads(cfg.threads)
    if cfg.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0: off), got {cfg.checkpoint_every}")
    if not (math.isfinite(cfg.var_floor) and cfg.var_floor >= 0):
        raise ValueError(f"--var-floor must be a finite number >= 0, got {cfg.var_floor}")
    fmax = torch.finfo(getattr(torch, cfg.dtype, torch.float32)).max
    if cfg.var_floor > fmax:
        raise ValueError(f"--var-floor must be <= {fmax:.3g} (finite in {cfg.dtype}), got {cfg.var_floor:.3g}")
    if cfg.data not in DATA_SOURCES:
        raise ValueError(f"--data must be one of {DATA_SOURCES}, got {cfg.data!r}")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    if cfg.scorer not in SCORER_NAMES:
        raise ValueError(f"--scorer must be one of {SCORER_NAMES}, got {cfg.scorer!r}")
    if cfg.backward not in BACKWARDS:
        raise ValueError(f"--backward must be one of {BACKWARDS}, got {cfg.backward!r}")
    if cfg.implicit_solver not in SOLVERS:
        raise ValueError(f"--implicit-solver must be one of {SOLVERS}, got {cfg.implicit_solver!r}")
    if not cfg.tol >= 0:
        raise ValueError(f"--tol must be >= 0, got {cfg.tol}")
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {cfg.dtype!r}")
    for name in ("tuples", "steps", "concept_size", "n_relevant", "n_irrelevant", "dim", "width", "depth", "val_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"--lr-schedule must be cosine or constant, got {cfg.lr_schedule!r}")
    if cfg.warm_start and cfg.objective == "classify":
        raise ValueError("--warm-start warms the mixture fits of --objective histogram; --objective classify fits none")
    if cfg.warm_start and not cfg.scorer.startswith("gmm"):
        raise ValueError(f"--warm-start needs a mixture scorer (gmm2, gmm3, ...), got --scorer {cfg.scorer}")
    if not (math.isfinite(cfg.warm_var_floor) and cfg.warm_var_floor > 0):
        raise ValueError(f"--warm-var-floor must be a finite number > 0, got {cfg.warm_var_floor}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): constant, or cosine-annealed from
    ``lr`` towards 0 over ``steps`` (a pure function of the step, so resuming needs no
    scheduler state; resuming with another ``--steps`` reshapes the rest of the curve)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))


#: Warnings of the mixture fit that a training run counts instead of printing every step.
FIT_WARNINGS = (ConvergenceWarning, ImplicitGradientWarning)


class FitWarningCounter:
    """Counts the fit's per-step warnings (sets that did not converge, implicit solves that
    fell back to an unrolled gradient): the first of each kind is printed, and the number
    of steps that raised each kind goes into every validation record of log.jsonl."""

    def __init__(self) -> None:
        self.counts: Dict[str, int] = {}
        self.seen: set = set()

    def record(self, caught: Sequence[warnings.WarningMessage], announce: bool) -> None:
        for kind in {w.category.__name__: w for w in caught if issubclass(w.category, FIT_WARNINGS)}.values():
            name = kind.category.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            if announce and name not in self.seen:
                print(f"s2m-train: {name}: {kind.message} (later ones are counted per step in log.jsonl)",
                      file=sys.stderr, flush=True)
            self.seen.add(name)
        for w in caught:  # anything else is shown as usual
            if not issubclass(w.category, FIT_WARNINGS):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    def take(self) -> Dict[str, int]:
        """Steps per warning kind since the last call."""
        counts, self.counts = self.counts, {}
        return counts


# ----------------------------------------------------------------------------- distributed
def _distributed() -> tuple:
    """(rank, world_size, local_rank); initialises the process group under torchrun.

    torch._dynamo is imported with this module, before any process group exists: imported
    later (DistributedDataParallel and the optimiser's first use import it), it keeps
    references to the default group, so destroy_process_group leaves gloo's threads running
    into the interpreter's shutdown, where they can abort the process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def default_threads(processes: int = 1) -> int:
    """CPU threads per process when none are asked for: this process's share of the cores
    that are idle now (cores minus the 1-minute load average), at least 1. A small CNN gains
    little from threads, and oversubscribed cores make every op's thread sync ~10x slower."""
    cores = os.cpu_count() or 1
    try:
        idle = cores - int(round(os.getloadavg()[0]))
    except OSError:  # no load average on this platform
        idle = cores
    return max(1, min(cores, idle) // max(1, processes))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validation_map(model, data, concept_size: int, seed: int, dtype: torch.dtype) -> float:
    """mAP of the model's own scorer on ``data`` with clean concept sets (one seeded draw)."""
    was_training = model.training
    model.eval()
    desc = embed_all(model, data.images, dtype=dtype)
    gen = torch.Generator().manual_seed(mix_seed(seed, 7))
    concepts = sample_concepts(data.labels, concept_size, 0.0, gen)
    scores = retrieval_scores(model.scorer, desc, concepts.to(desc.device), gen)
    model.train(was_training)
    return float(retrieval_ap(scores.cpu(), data.labels, concepts).mean())


# ----------------------------------------------------------------------------- training
class Classifier(torch.nn.Module):
    """The PL objective's network: ``model``'s embedding followed by a linear ``head`` over
    the training classes, images (n, C, H, W) -> logits (n, classes). The head sees the
    embedding's raw output; the descriptors kept afterwards are its L2-normalised version."""

    def __init__(self, model, n_classes: int) -> None:
        super().__init__()
        self.model = model
        self.head = torch.nn.Linear(model.embed.dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.embed(images))


def classify_batch(data, seed: int, step: int, size: int) -> torch.Tensor:
    """Indices (size,) of the training images of step ``step`` of a PL run: drawn uniformly
    (with replacement) from a generator seeded by (seed, step), so a resumed run continues
    exactly and every rank of a data-parallel run sees the same global batch."""
    gen = torch.Generator().manual_seed(mix_seed(seed, step, 53))
    return torch.randint(len(data), (size,), generator=gen)


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_embedding(model, path: str, embedding: Dict[str, Any]) -> None:
    """Start from the embedding weights of another s2m-train checkpoint (fine-tuning, e.g.
    S2M-GMM2 from S2M-Gauss); its embedding must be ``embedding``, this run's."""
    source = load_checkpoint(path)
    if source["model"]["embedding"] != embedding:
        raise ValueError(f"--init-from {path}: its embedding {source['model']['embedding']} differs from this run's {embedding}")
    weights = {k[len("embed."):]: v for k, v in source["state_dict"].items() if k.startswith("embed.")}
    model.embed.load_state_dict(weights)


def _resume_config(cfg: TrainConfig, explicit: Sequence[str], saved: Dict[str, Any]) -> TrainConfig:
    """The saved run's config with the runtime fields given on the command line; a
    training-defining field given with another value is an error."""
    merged = TrainConfig(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    conflicts = []
    for name in explicit:
        value = getattr(cfg, name)
        if name in RUNTIME_FIELDS:
            setattr(merged, name, value)
        elif value != saved.get(name):
            conflicts.append(f"--{name.replace('_', '-')} {value!r} (the run used {saved.get(name)!r})")
    if conflicts:
        raise ValueError("cannot resume with different training settings: " + "; ".join(conflicts))
    return merged


def train(cfg: TrainConfig, explicit: Sequence[str] = (), *, stop_after: int = 0) -> Dict[str, Any]:
    """Run (or resume) a training run; returns a summary dict (steps done, last loss, best
    validation mAP, checkpoint paths, the model). ``explicit`` names the fields the user set
    (when resuming, only those override the checkpoint's config). torch's CPU thread count
    is set for the run and restored afterwards. ``stop_after`` > 0 simulates a run killed
    after that many steps (it leaves without the final checkpoint; for tests of resuming)."""
    threads_before = torch.get_num_threads()
    try:
        run = _Run(cfg, explicit)
        try:
            while run.step < run.cfg.steps:
                run.train_step()
                last = run.step == run.cfg.steps
                run.validate(last)
                if stop_after and run.step >= stop_after and not last:
                    return {"step": run.step, "interrupted": True, "history": run.history}
                run.checkpoint(last)
        finally:
            run.close_progress()
        return run.finish()
    finally:
        torch.set_num_threads(threads_before)


class _Run:
    """One training run: its configuration, model, optimiser, data and bookkeeping. Built (or
    restored from a checkpoint) by the constructor; :func:`train` drives the steps."""

    def __init__(self, cfg: TrainConfig, explicit: Sequence[str]) -> None:
        self.rank, self.world, local_rank = _distributed()
        resume_payload = None
        if cfg.resume:
            path = Path(cfg.out) / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
            resume_payload = load_checkpoint(path)
            if cfg.resume != "auto" and "out" in explicit and path.resolve().parent != Path(cfg.out).resolve():
                raise ValueError(f"--resume {path} continues the run in {path.parent}; --out {cfg.out} names another "
                                 "folder (omit --out, or resume that folder's last.pt)")
            cfg = _resume_config(cfg, explicit, resume_payload["config"])
            cfg.resume = str(path)
            if cfg.steps < int(resume_payload["step"]):
                raise ValueError(f"--steps {cfg.steps} is below the {resume_payload['step']} steps the resumed run has done")
        _check_config(cfg)
        if cfg.tuples % self.world:
            raise ValueError(f"--tuples ({cfg.tuples}) must be divisible by the number of processes ({self.world})")
        self.cfg = cfg
        self.threads = cfg.threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))
        torch.set_num_threads(self.threads)
        self.device = _device(cfg, local_rank)
        self.dtype = getattr(torch, cfg.dtype)

        splits = load_splits(data_spec(cfg), which=("train", "val"))
        self.train_data, self.val_data = splits["train"], splits["val"]
        torch.manual_seed(cfg.seed)
        self.model = model_from_spec(model_spec(cfg)).to(self.device, self.dtype)
        if cfg.init_from and resume_payload is None:
            _load_embedding(self.model, cfg.init_from, model_spec(cfg)["embedding"])
        self.classifier = Classifier(self.model, self.train_data.n_classes).to(self.device, self.dtype) \
            if cfg.objective == "classify" else None
        trained = self.model if self.classifier is None else self.classifier
        self.optimizer = torch.optim.Adam(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.warm_start = WarmStartCache(cfg.warm_var_floor) if cfg.warm_start else None
        self.model.warm_start = self.warm_start
        self.step, self.history, self.val_history, self.best_val, self.elapsed_before = 0, [], [], -math.inf, 0.0
        if resume_payload is not None:
            self.model.load_state_dict(resume_payload["state_dict"])
            if self.classifier is not None:
                self.classifier.head.load_state_dict(resume_payload["head"])
            self.optimizer.load_state_dict(resume_payload["optimizer"])
            self.step = int(resume_payload["step"])
            self.history, self.val_history = list(resume_payload["history"]), list(resume_payload["val_history"])
            self.best_val = float(resume_payload["best_val"])
            self.elapsed_before = float(resume_payload.get("elapsed_s", 0.0))
            if self.warm_start is not None:
                self.warm_start.load_state_dict(resume_payload["warm_start"], self.device)
            _set_rng_state(resume_payload["rng"])
        self.net = trained
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(trained, device_ids=device_ids)

        self.sampler = EpisodeSampler(self.train_data, cfg.concept_size, cfg.n_relevant, cfg.n_irrelevant, cfg.noise,
                                      cfg.polysemy, cfg.seed)
        self.loss_fn = HistogramLoss(cfg.bins)
        self.local = cfg.tuples // self.world
        self.out = Path(cfg.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.bar = None
        if self.rank == 0 and cfg.progress:
            tqdm = require("tqdm.auto", "train", "the progress bar (--no-progress turns it off)").tqdm
            name = "pl" if cfg.objective == "classify" else cfg.scorer
            self.bar = tqdm(total=cfg.steps, initial=self.step, desc=f"s2m-train {name}", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.started = self.last_save = time.monotonic()
        if self.rank == 0:
            self.log({"event": "resume" if resume_payload is not None else "start", "step": self.step,
                      "world_size": self.world, "threads": self.threads, "config": dataclasses.asdict(cfg)})
        self.model.train()
        self.ema: Optional[float] = None
        self.fit_warnings = FitWarningCounter()

    def elapsed(self) -> float:
        """Seconds of training so far, over every resumed part of the run."""
        return self.elapsed_before + time.monotonic() - self.started

    def payload(self) -> Dict[str, Any]:
        """The checkpoint of the run as it is now."""
        cfg = self.cfg
        return {
            "config": dataclasses.asdict(cfg),
            "model": model_spec(cfg),
            "data": data_spec(cfg),
            "state_dict": self.model.state_dict(),
            **({} if self.classifier is None else {"head": self.classifier.head.state_dict()}),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": _rng_state(),
            "history": self.history,
            "val_history": self.val_history,
            "best_val": self.best_val,
            "world_size": self.world,
            "elapsed_s": self.elapsed(),
            "warm_start": None if self.warm_start is None else self.warm_start.state_dict(),
        }

    def log(self, record: Dict[str, Any]) -> None:
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def train_step(self) -> None:
        """One optimisation step on this process's share of the tuples."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        if self.classifier is not None:
            loss = self._classify_loss()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:
            batch = self.sampler.batch(self.step, self.rank * self.local, (self.rank + 1) * self.local)
            concept, queries = batch.images(self.train_data, self.dtype, self.device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FIT_WARNINGS)
                warm_keys = batch.classes if self.warm_start is not None else None
                scores = self.net(concept, queries, generators=batch.generators(), warm_keys=warm_keys)
                loss = self.loss_fn(scores[:, : cfg.n_relevant], scores[:, cfg.n_relevant :])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.fit_warnings.record(caught, announce=self.rank == 0)
        self.optimizer.step()
        self.step += 1
        step_loss = loss.detach()
        if self.world > 1:  # for the log only: the mean over the global batch
            dist.all_reduce(step_loss)
            step_loss /= self.world
        self.history.append(float(step_loss))
        self.ema = self.history[-1] if self.ema is None else 0.98 * self.ema + 0.02 * self.history[-1]
        if self.bar is not None:
            self.bar.update(1)
            val = f"{self.val_history[-1]['map']:.3f}" if self.val_history else "-"
            self.bar.set_postfix(loss=f"{self.ema:.4f}", val_mAP=val)

    def _classify_loss(self) -> torch.Tensor:
        """Cross-entropy of this process's share of the step's images (see :func:`classify_batch`)."""
        cfg = self.cfg
        per_tuple = cfg.concept_size + cfg.n_relevant + cfg.n_irrelevant
        idx = classify_batch(self.train_data, cfg.seed, self.step, cfg.tuples * per_tuple)
        idx = idx[self.rank * self.local * per_tuple : (self.rank + 1) * self.local * per_tuple]
        images = self.train_data.images[idx].to(self.device, self.dtype) / 255.0
        labels = self.train_data.labels[idx].to(self.device)
        return torch.nn.functional.cross_entropy(self.net(images), labels)

    def validate(self, last: bool) -> None:
        """Every val_every steps and at the end (rank 0): validation mAP, logged; a new best
        is saved as best.pt."""
        cfg = self.cfg
        if self.rank != 0 or not (self.step % cfg.val_every == 0 or last):
            return
        val_map = validation_map(self.model, self.val_data, cfg.concept_size, cfg.val_seed, self.dtype)
        self.val_history.append({"step": self.step, "map": val_map})
        recent = self.history[-cfg.val_every :]
        self.log({"event": "val", "step": self.step, "loss": sum(recent) / len(recent), "val_map": val_map,
                  "fit_warnings": self.fit_warnings.take(), "elapsed_s": round(self.elapsed(), 1),
                  **self.warm_start_counts()})
        if val_map > self.best_val:
            self.best_val = val_map
            save_checkpoint(self.out / "best.pt", self.payload())

    def warm_start_counts(self) -> Dict[str, int]:
        """This process's warm and fresh fits so far and its cached concepts ({} without a cache)."""
        if self.warm_start is None:
            return {}
        return {"warm_fits": self.warm_start.warm_fits, "fresh_fits": self.warm_start.fresh_fits,
                "cached_concepts": len(self.warm_start)}

    def checkpoint(self, last: bool) -> None:
        """last.pt every checkpoint_every steps, every checkpoint_minutes and at the end (rank 0)."""
        cfg = self.cfg
        due = (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or (
            time.monotonic() - self.last_save >= 60 * cfg.checkpoint_minutes
        )
        if self.rank == 0 and (due or last):
            save_checkpoint(self.out / "last.pt", self.payload())
            self.last_save = time.monotonic()

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self) -> Dict[str, Any]:
        """The end of a completed run: the final log record, and the summary of :func:`train`."""
        if self.rank == 0:
            self.log({"event": "end", "step": self.step, "best_val_map": self.best_val,
                      "elapsed_s": round(self.elapsed(), 1), **self.warm_start_counts()})
        if self.world > 1:
            dist.barrier()
        return {
            "step": self.step,
            "interrupted": False,
            "history": self.history,
            "val_history": self.val_history,
            "best_val": self.best_val,
            "last": str(self.out / "last.pt"),
            "best": str(self.out / "best.pt"),
            "model": self.model,
        }


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="s2m-train",
        description="Meta-train an embedding CNN with a Set2Model (gauss, gmm2..4) or baseline (avg, nn) scorer "
        "and the histogram loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATA_SOURCES, help=f"data source (default {d.data}: built-in glyphs, no download)")
    g.add_argument("--data-root", help="Omniglot folder or zip (default: $S2M_OMNIGLOT_ROOT, ../shared/data/omniglot)")
    g.add_argument("--split-by", choices=("character", "alphabet"), help=f"Omniglot split (default {d.split_by})")
    g.add_argument("--train-classes", type=int, help=f"glyph training classes (default {d.train_classes})")
    g.add_argument("--val-classes", type=int, help=f"glyph validation classes (default {d.val_classes})")
    g.add_argument("--test-classes", type=int, help=f"glyph test classes (default {d.test_classes})")
    g.add_argument("--per-class", type=int, help=f"glyph instances per class (default {d.per_class})")
    g.add_argument("--data-seed", type=int, help=f"glyph world seed / Omniglot split seed (default {d.data_seed})")
    g = p.add_argument_group("episodes")
    g.add_argument("--tuples", type=int, help=f"tuples per step, the global batch (default {d.tuples})")
    g.add_argument("--concept-size", type=int, help=f"concept set size N (default {d.concept_size})")
    g.add_argument("--n-relevant", type=int, help=f"relevant items per tuple (default {d.n_relevant})")
    g.add_argument("--n-irrelevant", type=int, help=f"irrelevant items per tuple (default {d.n_irrelevant})")
    g.add_argument("--noise", type=float, help=f"fraction of each concept set from other classes (default {d.noise})")
    g.add_argument("--polysemy", type=float, help=f"probability of a two-class concept (default {d.polysemy})")
    g = p.add_argument_group("model")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help=f"histogram: the scorer's histogram loss (FT); classify: a softmax classifier of the training "
                        f"classes, whose head is dropped afterwards (PL) (default {d.objective})")
    g.add_argument("--scorer", choices=SCORER_NAMES,
                   help=f"scorer trained end-to-end; with --objective classify, the scorer of the validation mAP "
                        f"(default {d.scorer})")
    g.add_argument("--dim", type=int, help=f"descriptor size (default {d.dim})")
    g.add_argument("--width", type=int, help=f"CNN channels (default {d.width})")
    g.add_argument("--depth", type=int, help=f"CNN blocks (default {d.depth})")
    g.add_argument("--n-iter", type=int, help=f"EM iterations of the mixtures (default {d.n_iter})")
    g.add_argument("--var-floor", type=float, help=f"variance floor of the Gaussians (default {d.var_floor})")
    g.add_argument("--tol", type=float, help=f"per-set EM stopping tolerance, 0 = always --n-iter (default {d.tol})")
    g.add_argument("--backward", choices=BACKWARDS,
                   help=f"gradient of the fit: the unrolled iterations or the implicit one of the optimum (default {d.backward})")
    g.add_argument("--implicit-solver", choices=SOLVERS,
                   help=f"adjoint solver of --backward implicit (default {d.implicit_solver}: far fewer failed solves "
                        "than fixed_point where EM converges slowly)")
    g.add_argument("--bins", type=int, help=f"histogram loss bins (default {d.bins})")
    g.add_argument("--dtype", choices=("float32", "float64"), help=f"parameter dtype (default {d.dtype})")
    g.add_argument("--init-from", help="start from the embedding of another s2m-train checkpoint (fine-tuning)")
    g.add_argument("--warm-start", action="store_true",
                   help="warm-start each class's EM from its last fit in training (the paper's per-class cache; "
                        "mixture scorers; validation and evaluation fit fresh)")
    g.add_argument("--warm-var-floor", type=float,
                   help=f"variance floor of a warm-started fit (default {d.warm_var_floor}; fresh fits use --var-floor)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"total training steps (default {d.steps})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), help=f"learning-rate schedule (default {d.lr_schedule})")
    g.add_argument("--weight-decay", type=float, help=f"Adam weight decay (default {d.weight_decay})")
    g.add_argument("--seed", type=int, help=f"seed of the weights and the episodes (default {d.seed})")
    g = p.add_argument_group("run")
    g.add_argument("--out", help=f"output folder (default {d.out})")
    g.add_argument("--resume", nargs="?", const="auto",
                   help="continue from a checkpoint (default <out>/last.pt); the saved settings are used")
    g.add_argument("--checkpoint-minutes", type=float, help=f"minutes between checkpoints (default {d.checkpoint_minutes})")
    g.add_argument("--checkpoint-every", type=int, help="also checkpoint every this many steps (default 0: off)")
    g.add_argument("--val-every", type=int, help=f"steps between validation mAPs (default {d.val_every})")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default auto)")
    g.add_argument("--threads", type=int, help="CPU threads (default: the idle cores / local processes, at least 1)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill after this step
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    cfg = TrainConfig(**args)
    try:
        summary = train(cfg, explicit=list(args))
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"s2m-train: error: {exc}\n")
    if int(os.environ.get("RANK", "0")) == 0:
        if summary["interrupted"]:
            print(f"s2m-train: stopped after step {summary['step']} (no final checkpoint)")
        else:
            print(f"s2m-train: {summary['step']} steps, final loss {summary['history'][-1]:.4f}, "
                  f"best validation mAP {summary['best_val']:.4f}; checkpoint {summary['last']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
