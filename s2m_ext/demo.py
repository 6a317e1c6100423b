"""The main job: a short meta-training on the built-in glyphs and the evaluation table.

    python -m s2m_ext.demo                      # a few minutes on a CPU
    python -m s2m_ext.demo --steps 3000 --width 64 --out runs/demo-long

Trains S2M-Gauss, S2M-GMM2, AVG-FT and NN-FT (the same CNN and episodes, each with the
histogram loss on its own score) on glyph classes, then ranks held-out glyph classes with
each of them, with clean and 30%-noisy concept sets (s2m-eval), and prints the mAP table.
It is the same as running s2m-train four times and s2m-eval once (the commands are printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import eval as s2m_eval
from .train import TrainConfig, train

SCORERS = ("gauss", "gmm2", "avg", "nn")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m s2m_ext.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=int, default=400, help="training steps per model")
    p.add_argument("--width", type=int, default=32, help="CNN channels")
    p.add_argument("--train-classes", type=int, default=500, help="glyph training classes")
    p.add_argument("--test-classes", type=int, default=100, help="held-out glyph classes ranked")
    p.add_argument("--seeds", type=int, default=3, help="concept-set draws per model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: the idle cores, at least 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = p.parse_args(argv)
    out = Path(args.out)
    started = time.monotonic()
    checkpoints = []
    for scorer in SCORERS:
        cfg = TrainConfig(
            data="glyphs", train_classes=args.train_classes, val_classes=50, test_classes=args.test_classes,
            scorer=scorer, width=args.width, steps=args.steps, val_every=max(1, args.steps // 2),
            out=str(out / scorer), threads=args.threads, device=args.device,
        )
        print(f"$ s2m-train --scorer {scorer} --steps {args.steps} --width {args.width} --train-classes "
              f"{args.train_classes} --val-classes 50 --test-classes {args.test_classes} --out {cfg.out}", flush=True)
        train(cfg)
        checkpoints.append(str(out / scorer / "last.pt"))
    eval_args = checkpoints + ["--noise", "0", "0.3", "--seeds", str(args.seeds),
                               "--json", str(out / "results.json"), "--png", str(out / "results.png")]
    if args.threads:
        eval_args += ["--threads", str(args.threads)]
    print("$ s2m-eval " + " ".join(eval_args), flush=True)
    s2m_eval.main(eval_args)
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
