"""Workloads of the benchmark suite: shapes, the inputs every contender shares, and the FLOP
and byte models used to turn times into throughput (formulas explained in bench/NOTES.md).

Five workloads:

* ``forward``  T EM iterations from given initial parameters (plus the final E-step that
  gives the log-likelihood of the fitted model), no gradient;
* ``fwd_bwd``  the same under autograd, then the gradient of a fixed random linear function of
  the fitted (log_weights, means, variances) with respect to the points x;
* ``pool``     log-density of every item of a shared pool z (M, D) under every one of the B
  fitted mixtures -> (B, M) (retrieval scoring), no gradient;
* ``paired``   log-density of Q queries per set, z (B, Q, D), each row under its own set's
  fitted mixture -> (B, Q) (the scoring of a training episode), no gradient;
* ``seed``     the k-means++ initial model of every set, as ``fit_gmm(n_iter=0)`` makes it:
  K seeded means, the set's weighted variance + var_floor, uniform weights, and the
  log-likelihood of that model, from a generator of a fixed seed (so every contender draws
  the same uniforms and seeds the same points), no gradient.

Every contender gets the same tensors (same seed), float32, all point weights 1 (scikit-learn
has no point weights), and the same initial parameters: one batched k-means++ draw made
before timing starts, so initialisation is never part of a timed call (``seed`` times it).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

WORKLOADS: Tuple[str, ...] = ("forward", "fwd_bwd", "pool", "paired", "seed")

#: The workloads that score a fitted model (the rest fit one).
SCORING_WORKLOADS: Tuple[str, ...] = ("pool", "paired")

#: variance floor handed to every contender (s2m_ext's default; scikit-learn's reg_covar).
VAR_FLOOR = 1e-3

#: The agreement check compares the outputs of this many sets (a seeded random subset; all
#: sets when B is smaller), which bounds what a check copies at GPU-scale shapes.
CHECK_SETS = 64


@dataclass(frozen=True, order=True)
class Shape:
    """B sets of N points in D dimensions, K components, T EM iterations, M pool items,
    Q paired queries per set.

    M only matters for the ``pool`` workload, Q only for ``paired``, N only for
    ``forward``/``fwd_bwd``/``seed`` (T also fits the model the scoring workloads score; it
    plays no part in ``seed``)."""

    B: int
    N: int
    D: int
    K: int
    T: int = 10
    M: int = 1024
    Q: int = 64

    def label(self, workload: str) -> str:
        if workload == "pool":
            return f"B{self.B} M{self.M} D{self.D} K{self.K}"
        if workload == "paired":
            return f"B{self.B} Q{self.Q} D{self.D} K{self.K}"
        if workload == "seed":
            return f"B{self.B} N{self.N} D{self.D} K{self.K}"
        return f"B{self.B} N{self.N} D{self.D} K{self.K} T{self.T}"

    def key(self, workload: str) -> Tuple[int, ...]:
        """The fields that define the work of ``workload`` (used to de-duplicate cells)."""
        if workload == "pool":
            return (self.B, self.M, self.D, self.K)
        if workload == "paired":
            return (self.B, self.Q, self.D, self.K)
        if workload == "seed":
            return (self.B, self.N, self.D, self.K)
        return (self.B, self.N, self.D, self.K, self.T)

    def replace(self, **fields: int) -> "Shape":
        return dataclasses.replace(self, **fields)

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


#: Named shapes. "paper": the Set2Model paper's Omniglot training batch (5 tuples, concept sets
#: of 10 images, 100-d descriptors, GMM2; a pool of 5 x 20 relevant+irrelevant items).
#: "core": the shape of the core speed targets. "medium" and "large": the GPU targets' scale
#: ladder (large is GPU scale: on the CPU only s2m_ext runs it, and only without --quick).
#: "bigset": a few sets of thousands of points (whole-slide images as 10^4 patch embeddings of
#: a ViT, K prototypes), asked for by name only (``--shapes bigset``).
NAMED_SHAPES: Dict[str, Shape] = {
    "paper": Shape(B=5, N=10, D=100, K=2, T=10, M=100, Q=20),
    "core": Shape(B=256, N=64, D=128, K=4, T=10, M=1024, Q=64),
    "medium": Shape(B=1024, N=64, D=128, K=4, T=10, M=1024, Q=64),
    "large": Shape(B=16384, N=256, D=256, K=8, T=10, M=16384, Q=256),
    "bigset": Shape(B=4, N=16384, D=768, K=16, T=3, M=1024, Q=64),
}

#: The base each sweep varies one field of: "core" on the CPU, "medium" on a GPU.
SWEEP_BASE = {"cpu": "core", "cuda": "medium"}

#: Sweep values per field. Quick sweeps keep three points per axis (enough to read a slope on
#: a log-log plot); full sweeps go further where the device can afford it.
SWEEPS_FULL: Dict[str, Dict[str, List[int]]] = {
    "cpu": {
        "B": [16, 64, 256, 1024, 4096],
        "N": [16, 32, 64, 128, 256],
        "D": [16, 32, 64, 128, 256],
        "K": [1, 2, 4, 8, 16],
        "T": [1, 3, 10, 30],
        "M": [128, 512, 1024, 4096, 16384],
        "Q": [16, 64, 256, 1024],
    },
    "cuda": {
        "B": [64, 256, 1024, 4096, 16384],
        "N": [16, 32, 64, 128, 256],
        "D": [16, 32, 64, 128, 256],
        "K": [1, 2, 4, 8, 16],
        "T": [1, 3, 10, 30],
        "M": [1024, 4096, 16384, 65536],
        "Q": [16, 64, 256, 1024],
    },
}
SWEEPS_QUICK: Dict[str, Dict[str, List[int]]] = {
    "cpu": {"B": [16, 256, 1024], "N": [16, 64, 256], "D": [32, 128, 256], "K": [1, 4, 16], "T": [1, 10, 30],
            "M": [256, 1024, 4096], "Q": [16, 64, 256]},
    "cuda": {"B": [256, 1024, 16384], "N": [16, 64, 256], "D": [32, 128, 256], "K": [1, 4, 16], "T": [1, 10, 30],
             "M": [1024, 16384, 65536], "Q": [16, 64, 256]},
}

#: The fields each workload is swept over (T does not change the scoring workloads' work; N
#: does not either: their sizes are M and Q).
SWEEP_FIELDS: Dict[str, Tuple[str, ...]] = {
    "forward": ("B", "N", "D", "K", "T"),
    "fwd_bwd": ("B", "N", "D", "K", "T"),
    "pool": ("B", "M", "D", "K"),
    "paired": ("B", "Q", "D", "K"),
    "seed": ("B", "N", "D", "K"),
}


# ----------------------------------------------------------------------------- inputs
@dataclass
class Problem:
    """The inputs of one shape, shared by every contender.

    x (B,N,D); weights (B,N) all ones; init = (log_weights (B,K), means (B,K,D),
    variances (B,K,D)) from one k-means++ draw; cotangents = fixed random (B,K), (B,K,D),
    (B,K,D) tensors: ``fwd_bwd`` differentiates sum(cot_lw*lw) + sum(cot_mu*mu) +
    sum(cot_var*var) of the fitted parameters; pool_z (M,D) or paired_z (B,Q,D) and the
    fitted model (log_weights, means, variances) that scores it.
    """

    shape: Shape
    device: torch.device
    dtype: torch.dtype
    x: Tensor
    weights: Tensor
    init: Tuple[Tensor, Tensor, Tensor]
    cotangents: Tuple[Tensor, Tensor, Tensor]
    pool_z: Optional[Tensor] = None
    fitted_model: Optional[Tuple[Tensor, Tensor, Tensor]] = None
    paired_z: Optional[Tensor] = None
    var_floor: float = VAR_FLOOR
    #: (<= CHECK_SETS,) sorted indices of the sets whose outputs are compared between contenders
    check_sets: Optional[Tensor] = None
    #: ``seed``: the seed of the generator every contender's seeding call draws from
    seeding_seed: int = 0

    def queries(self, workload: str) -> Tensor:
        """What a scoring workload scores: pool_z (M,D) or paired_z (B,Q,D)."""
        z = self.pool_z if workload == "pool" else self.paired_z
        assert z is not None, f"no queries for {workload!r}"
        return z


def make_problem(
    shape: Shape,
    workload: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    draw_on: str | torch.device = "cpu",
) -> Problem:
    """Seeded inputs for ``workload`` at ``shape``.

    Points are drawn from K well-separated clusters per set (centres N(0, 0.5^2 I), unit
    noise), like descriptors of a polysemous concept, so that EM is well conditioned and
    float32 contenders agree with each other to rounding (which the suite checks).

    ``draw_on``: where the random draws are made, in the target dtype (no float64 copy of
    GPU-scale inputs), before the move to ``device``. The default, the CPU, gives the same
    inputs on every device; ``draw_on=device`` on a GPU skips seconds of CPU sampling at
    the largest shapes (other numbers, the same distribution)."""
    import s2m_ext

    device, draw_on = torch.device(device), torch.device(draw_on)
    gen = torch.Generator(device=draw_on).manual_seed(seed)
    B, N, D, K = shape.B, shape.N, shape.D, shape.K
    centres = 0.5 * torch.randn(B, K, D, generator=gen, dtype=dtype, device=draw_on)
    labels = torch.randint(0, K, (B, N), generator=gen, device=draw_on)
    x_drawn = torch.gather(centres, 1, labels.unsqueeze(-1).expand(B, N, D))
    x_drawn += torch.randn(B, N, D, generator=gen, dtype=dtype, device=draw_on)
    x = x_drawn.to(device).contiguous()
    weights = torch.ones(B, N, device=device, dtype=dtype)
    # n_iter=0: the k-means++ initial parameters themselves.
    init = s2m_ext.fit_gmm(x, weights, n_components=K, n_iter=0, var_floor=VAR_FLOOR, generator=gen).params()
    init = tuple(t.contiguous() for t in init)
    cot = tuple(torch.randn(t.shape, generator=gen, dtype=dtype, device=draw_on).to(device) for t in init)
    problem = Problem(shape, device, dtype, x, weights, init, cot)
    # Its own generator: the inputs above do not depend on how many sets are checked.
    pick = torch.randperm(B, generator=torch.Generator().manual_seed(seed + 1))[:CHECK_SETS]
    problem.check_sets = pick.sort().values
    problem.seeding_seed = seed + 2
    if workload in SCORING_WORKLOADS:
        with torch.no_grad():
            fitted = s2m_ext.fit_gmm(
                x, weights, init=s2m_ext.DiagGMM(*init), n_iter=shape.T, var_floor=VAR_FLOOR
            )
        problem.fitted_model = tuple(t.contiguous() for t in fitted.params())
        # Items: points of random sets plus noise, so that scores are in a realistic range.
        count = shape.M if workload == "pool" else B * shape.Q
        src = x_drawn.reshape(B * N, D)[torch.randint(0, B * N, (count,), generator=gen, device=draw_on)]
        z = src + 0.5 * torch.randn(count, D, generator=gen, dtype=dtype, device=draw_on)
        if workload == "pool":
            problem.pool_z = z.to(device).contiguous()
        else:
            problem.paired_z = z.view(B, shape.Q, D).to(device).contiguous()
        # x, init and cotangents are not needed to score: drop them to keep memory honest.
        problem.x = x.new_empty(0, N, D)  # (a view would keep x's storage alive)
        problem.weights = weights.new_empty(0, N)
        problem.cotangents = ()
    return problem


# ----------------------------------------------------------------------------- work models
#: FLOPs per (point, component, dimension) of each step (see bench/NOTES.md for the count).
FLOPS_E_STEP = 4  # diff, square, scale by 1/v, accumulate
FLOPS_M_STEP = 6  # mean: scale, accumulate; centred variance: diff, square, scale, accumulate
FLOPS_BACKWARD_ITER = 24  # recomputed E-step (4) + reverse of the M-step (10) and E-step (10)
FLOPS_POOL = 4  # per (pool item, set, component, dimension): the same quadratic form
FLOPS_PAIRED = FLOPS_POOL  # per (query, component, dimension)
FLOPS_SEED_DRAW = 3  # per (point, dimension) of each of the K - 1 draws after the first: diff, square, accumulate


def flops(workload: str, s: Shape) -> float:
    """Model FLOP count of one call of ``workload`` at ``s`` (lower-order terms dropped)."""
    nkd = float(s.B) * s.N * s.K * s.D
    forward = (s.T * (FLOPS_E_STEP + FLOPS_M_STEP) + FLOPS_E_STEP) * nkd
    if workload == "forward":
        return forward
    if workload == "fwd_bwd":
        return forward + s.T * FLOPS_BACKWARD_ITER * nkd
    if workload == "pool":
        return FLOPS_POOL * float(s.B) * s.M * s.K * s.D
    if workload == "paired":
        return FLOPS_PAIRED * float(s.B) * s.Q * s.K * s.D
    if workload == "seed":  # the draws, then the E-step of the log-likelihood
        return (FLOPS_SEED_DRAW * (s.K - 1) + FLOPS_E_STEP * s.K) * float(s.B) * s.N * s.D
    raise ValueError(f"unknown workload {workload!r}")


def compulsory_bytes(workload: str, s: Shape, itemsize: int = 4) -> float:
    """Bytes a call must move at least (each input read once, each output written once).

    A lower bound on DRAM traffic: a kernel that re-reads x every iteration moves more, so the
    bandwidth share computed from it is a lower bound as well."""
    params = s.B * s.K * (2 * s.D + 1)  # log_weights, means, variances of one step
    points = s.B * s.N * (s.D + 1)  # x and weights
    if workload == "forward":
        return itemsize * (points + 2 * params)
    if workload == "fwd_bwd":
        trajectory = (s.T + 1) * params
        # forward: read points + init, write trajectory; backward: read points, trajectory and
        # the cotangents, write the gradient of x.
        return itemsize * (points + params + trajectory + points + trajectory + params + s.B * s.N * s.D)
    if workload == "pool":
        return itemsize * (s.M * s.D + params + s.B * s.M)
    if workload == "paired":
        return itemsize * (s.B * s.Q * s.D + params + s.B * s.Q)
    if workload == "seed":
        return itemsize * (points + params)
    raise ValueError(f"unknown workload {workload!r}")


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Cell:
    """One (workload, shape) point of the plan, with the tags naming why it is there
    (a named shape and/or the sweeps it belongs to)."""

    workload: str
    shape: Shape
    tags: Tuple[str, ...]


def parse_shape(spec: str) -> Shape:
    """A shape written as its label, e.g. ``B4 N4096 D768 K16 T3`` (spaces or commas between
    fields; T, M and Q may be left out: 10, 1024 and 64)."""
    fields = {}
    for part in spec.replace(",", " ").split():
        match = re.fullmatch(r"([BNDKTMQ])=?([0-9]+)", part.strip())
        if match is None or match.group(1) in fields:
            raise ValueError(f"shape {spec!r}: expected fields like B4 N4096 D768 K16 T3 (each of B N D K once, "
                             f"T M Q optional), got {part!r}")
        fields[match.group(1)] = int(match.group(2))
    missing = [f for f in "BNDK" if f not in fields]
    if missing:
        raise ValueError(f"shape {spec!r} lacks {', '.join(missing)}")
    if min(fields.values()) < 1:
        raise ValueError(f"shape {spec!r}: every field must be >= 1")
    return Shape(**fields)


def plan(device: str, quick: bool, workloads: Sequence[str] = WORKLOADS,
         named: Sequence[str] = ("paper", "core", "medium", "large"), sweeps: bool = True,
         extra: Sequence[Shape] = ()) -> List[Cell]:
    """The cells of a summary run, de-duplicated (a sweep's base point is measured once),
    ordered by workload, then by model FLOPs so that slow contenders can be projected from
    smaller cells and skipped before they blow the time budget."""
    table = SWEEPS_QUICK if quick else SWEEPS_FULL
    base = NAMED_SHAPES[SWEEP_BASE[device]]
    cells: List[Cell] = []
    for workload in workloads:
        tagged: Dict[Tuple[int, ...], Tuple[Shape, List[str]]] = {}

        def add(shape: Shape, tag: str) -> None:
            key = shape.key(workload)
            if key not in tagged:
                tagged[key] = (shape, [])
            tagged[key][1].append(tag)

        for name in named:
            add(NAMED_SHAPES[name], name)
        for shape in extra:
            add(shape, "custom")
        if sweeps:
            for field in SWEEP_FIELDS[workload]:
                for value in table[device][field]:
                    add(base.replace(**{field: value}), f"sweep:{field}")
        ordered = sorted(tagged.values(), key=lambda item: (flops(workload, item[0]), item[0]))
        cells += [Cell(workload, shape, tuple(tags)) for shape, tags in ordered]
    return cells


def describe_flops() -> str:
    """One-line summary of the FLOP model, for the JSON results."""
    return (
        f"forward = (T*{FLOPS_E_STEP + FLOPS_M_STEP} + {FLOPS_E_STEP})*B*N*K*D; "
        f"fwd_bwd = forward + T*{FLOPS_BACKWARD_ITER}*B*N*K*D; pool = {FLOPS_POOL}*B*M*K*D; "
        f"paired = {FLOPS_PAIRED}*B*Q*K*D; seed = ({FLOPS_SEED_DRAW}*(K-1) + {FLOPS_E_STEP}*K)*B*N*D"
    )
