"""s2m-train: a tiny run learns, resume is exact, 2-process gloo data parallelism equals 1 process."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import List

import pytest
import torch
import torch.multiprocessing as mp

import s2m_ext
from s2m_ext import ImplicitBackward
from s2m_ext.data import EpisodeSampler, make_glyphs
from s2m_ext.nn import HistogramLoss, build_model
from s2m_ext.nn.checkpoint import load_checkpoint, model_from_checkpoint
from s2m_ext.train import TrainConfig, main, model_spec, train


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(
        data="glyphs", train_classes=24, val_classes=6, test_classes=6, per_class=20, tuples=4,
        width=8, depth=2, dim=8, steps=6, val_every=1000, threads=1, progress=False,
        checkpoint_minutes=1e6, out=str(tmp_path / name),
    )
    base.update(kw)
    return TrainConfig(**base)


def held_out_loss(model, cfg: TrainConfig) -> float:
    """Histogram loss on 24 fixed tuples the run never trains on (another sampler seed)."""
    data = make_glyphs("train", cfg.train_classes, cfg.per_class, cfg.data_seed)
    batch = EpisodeSampler(data, seed=12345).batch(0, 0, 24)
    concept, queries = batch.images(data, getattr(torch, cfg.dtype))
    with torch.no_grad():
        scores = model(concept, queries, generators=batch.generators())
    return float(HistogramLoss(cfg.bins)(scores[:, : cfg.n_relevant], scores[:, cfg.n_relevant :]))


@pytest.mark.parametrize("scorer", ["gauss", "gmm2", "avg"])
def test_tiny_training_lowers_the_loss(tmp_path, scorer):
    cfg = tiny(tmp_path, scorer, scorer=scorer, steps=40, lr=3e-3)
    torch.manual_seed(cfg.seed)  # the initial weights train() starts from
    initial = build_model(scorer, model_spec(cfg)["embedding"], cfg.n_iter, cfg.var_floor)
    before = held_out_loss(initial, cfg)
    summary = train(cfg)
    after = held_out_loss(summary["model"], cfg)
    assert after < 0.8 * before, (before, after)
    assert summary["step"] == 40 and len(summary["history"]) == 40
    log = [json.loads(line) for line in open(tmp_path / scorer / "log.jsonl")]
    assert log[0]["event"] == "start" and log[-1]["event"] == "end"
    assert any(r["event"] == "val" and 0.0 < r["val_map"] <= 1.0 for r in log)


def test_implicit_backward_trains_and_round_trips_through_the_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "implicit", scorer="gmm2", steps=40, lr=3e-3, n_iter=50, tol=1e-4, backward="implicit")
    torch.manual_seed(cfg.seed)
    before = held_out_loss(build_model("gmm2", model_spec(cfg)["embedding"], cfg.n_iter, cfg.var_floor), cfg)
    summary = train(cfg)
    assert held_out_loss(summary["model"], cfg) < 0.8 * before
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "implicit" / "last.pt")).scorer
    assert (rebuilt.n_iter, rebuilt.tol) == (50, 1e-4)
    assert rebuilt.backward == ImplicitBackward(solver=cfg.implicit_solver)


def test_fit_warnings_are_counted_per_step_and_printed_once(tmp_path, capsys):
    # One EM iteration can never meet tol (it needs two log-likelihoods), so every step warns.
    cfg = tiny(tmp_path, "warn", scorer="gmm2", steps=4, val_every=2, n_iter=1, tol=1e-3)
    train(cfg)
    val = [json.loads(line) for line in open(tmp_path / "warn" / "log.jsonl") if '"val"' in line]
    assert [r["fit_warnings"] for r in val] == [{"ConvergenceWarning": 2}, {"ConvergenceWarning": 2}]
    assert capsys.readouterr().err.count("ConvergenceWarning") == 1


def test_resume_after_interruption_is_exact(tmp_path):
    straight = train(tiny(tmp_path, "straight", scorer="gmm2", steps=7, checkpoint_every=3))
    # The same run killed after step 5: its last checkpoint is at step 3.
    cut = tiny(tmp_path, "cut", scorer="gmm2", steps=7, checkpoint_every=3)
    assert train(cut, stop_after=5)["interrupted"]
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert saved["step"] == 3 and len(saved["history"]) == 3
    resumed = train(replace(cut, resume="auto"), explicit=["resume", "out"])
    assert resumed["step"] == 7
    assert resumed["history"] == straight["history"]  # steps 4..7 recomputed, none lost or repeated
    final_a = load_checkpoint(tmp_path / "straight" / "last.pt")
    final_b = load_checkpoint(tmp_path / "cut" / "last.pt")
    for key, value in final_a["state_dict"].items():
        assert torch.equal(value, final_b["state_dict"][key]), key
    assert final_b["step"] == 7
    events = [(r["event"], r["step"]) for r in map(json.loads, open(tmp_path / "cut" / "log.jsonl"))]
    assert events == [("start", 0), ("resume", 3), ("val", 7), ("end", 7)]
    # A finished run resumed with more steps continues from where it ended.
    longer = train(replace(cut, resume="auto", steps=9), explicit=["resume", "out", "steps"])
    assert longer["step"] == 9 and longer["history"][:7] == straight["history"]


def test_resume_refuses_changed_training_settings(tmp_path):
    cfg = tiny(tmp_path, "run", steps=2)
    train(cfg)
    with pytest.raises(ValueError, match=r"--lr 0\.5 \(the run used 0\.001\)"):
        train(replace(cfg, resume="auto", lr=0.5), explicit=["resume", "out", "lr"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(replace(cfg, resume=str(tmp_path / "nothing.pt")), explicit=["resume"])


def _thread_names() -> List[str]:
    """The names of this process's threads (Linux)."""
    return [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    # The rendezvous store is the test's own (see below): every rank is a client of it, so no
    # rank's exit takes the store away while another rank is still tearing its group down.
    store = torch.distributed.TCPStore("127.0.0.1", port, world, is_master=False)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world)
    del store
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.distributed.destroy_process_group()
    if os.path.isdir("/proc/self/task"):
        # Nothing of the run may keep the group alive: its gloo threads outliving the program's
        # end can abort the process at exit.
        gloo = [name for name in _thread_names() if "gloo" in name]
        assert not gloo, f"rank {rank}: gloo threads alive after destroy_process_group: {gloo}"


@pytest.mark.parametrize("scorer", ["gmm2"])
def test_two_process_gloo_ddp_matches_one_process(tmp_path, scorer):
    # float64 so that the only difference, the order of the gradient sums across ranks,
    # stays at the 1e-16 level; 4 steps of Adam keep it far below the tolerance.
    common = dict(scorer=scorer, steps=4, tuples=4, dtype="float64", checkpoint_every=4)
    single = train(tiny(tmp_path, "one", **common))
    # The store binds port 0 itself and keeps it until the workers are done: no free port is
    # looked up, released and bound again later (another process could take it in between).
    store = torch.distributed.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    mp.start_processes(_ddp_worker, args=(2, store.port, tiny(tmp_path, "two", **common)), nprocs=2,
                       start_method="spawn", join=True)
    del store
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "last.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["step"] == 4
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-9, atol=1e-12, msg=key)
    # The logged loss is the mean over the global batch in both runs.
    torch.testing.assert_close(torch.tensor(two["history"]), torch.tensor(single["history"]), rtol=1e-9, atol=1e-12)


def test_cli_reports_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--data", "omniglot", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert info.value.code == 2
    assert "Omniglot data root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--scorer", "svm"])
    with pytest.raises(SystemExit) as info:
        main(["--tuples", "0", "--out", str(tmp_path / "o"), "--no-progress"])
    assert "--tuples must be >= 1" in capsys.readouterr().err


def test_torchrun_command_line_matches_one_process(tmp_path):
    # The documented entry point: torchrun --nproc_per_node=2 -m s2m_ext.train ... (gloo on CPU).
    import subprocess
    import sys

    args = ["--train-classes", "24", "--val-classes", "6", "--tuples", "4", "--width", "8", "--depth", "2",
            "--dim", "8", "--steps", "3", "--dtype", "float64", "--scorer", "gauss", "--threads", "1", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    # The workers import the s2m_ext this process imported (installed or built in place), from
    # a folder outside the source tree (python -m puts the working directory first).
    package_parent = os.path.dirname(s2m_ext.__path__[0])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))
    # The c10d rendezvous on port 0: torchrun's agent binds a port itself and holds it for the run.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           "-m", "s2m_ext.train", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "last.pt")
    assert two["world_size"] == 2 and two["step"] == 3
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_init_from_starts_from_another_runs_embedding(tmp_path):
    source = train(tiny(tmp_path, "gauss", scorer="gauss", steps=3))
    # One step at a negligible learning rate: the weights are the source's (Adam moves each by ~lr).
    tuned = train(tiny(tmp_path, "gmm2", scorer="gmm2", steps=1, lr=1e-12, init_from=source["last"]))
    for key, value in source["model"].embed.state_dict().items():
        torch.testing.assert_close(tuned["model"].embed.state_dict()[key], value, rtol=0, atol=1e-10, msg=key)
    with pytest.raises(ValueError, match="--init-from .* differs from this run's"):
        train(tiny(tmp_path, "wide", scorer="gmm2", steps=1, width=16, init_from=source["last"]))


def test_default_threads_stay_within_the_cores():
    from s2m_ext.train import default_threads

    cores = os.cpu_count() or 1
    assert 1 <= default_threads() <= cores
    assert default_threads(processes=4 * cores) == 1  # never 0, however many processes share the cores


def _train_cross_entropy(model, head, cfg: TrainConfig) -> float:
    """Cross-entropy of the classifier on all training images."""
    data = make_glyphs("train", cfg.train_classes, cfg.per_class, cfg.data_seed)
    with torch.no_grad():
        logits = head(model.embed(data.images.to(getattr(torch, cfg.dtype)) / 255.0))
    return float(torch.nn.functional.cross_entropy(logits, data.labels))


def test_pl_classifier_training_lowers_the_cross_entropy_and_resumes_exactly(tmp_path):
    from s2m_ext.train import Classifier

    pl = dict(objective="classify", scorer="avg", steps=100, lr=1e-2, checkpoint_every=40, tuples=2, train_classes=6,
              width=16)
    cfg = tiny(tmp_path, "pl", **pl)
    torch.manual_seed(cfg.seed)  # the initial weights train() starts from: embedding, then head
    initial = build_model("avg", model_spec(cfg)["embedding"])
    initial_head = Classifier(initial, cfg.train_classes).head
    before = _train_cross_entropy(initial, initial_head, cfg)
    straight = train(cfg)
    saved = load_checkpoint(tmp_path / "pl" / "last.pt")
    assert saved["model"]["objective"] == "classify" and saved["step"] == 100
    head = torch.nn.Linear(cfg.dim, cfg.train_classes)
    head.load_state_dict(saved["head"])
    after = _train_cross_entropy(model_from_checkpoint(saved), head, cfg)
    # ln(6) = 1.79 at chance; 100 Adam steps on 6 glyph classes get well below it (to ~0.6).
    assert after < 0.8 * before, (before, after)
    # The head is not part of the model: the checkpoint rebuilds an AVG model on the embedding.
    assert not any(k.startswith("head.") for k in saved["state_dict"]) and "embed.head.weight" in saved["state_dict"]
    # Killed after step 50: the checkpoint of step 40 is resumed, and the run ends where the straight one did.
    cut = tiny(tmp_path, "pl_cut", **pl)
    assert train(cut, stop_after=50)["interrupted"]
    assert load_checkpoint(tmp_path / "pl_cut" / "last.pt")["step"] == 40
    resumed = train(replace(cut, resume="auto"), explicit=["resume", "out"])
    assert resumed["history"] == straight["history"]
    final = load_checkpoint(tmp_path / "pl_cut" / "last.pt")
    for key, value in saved["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key
    for key, value in saved["head"].items():
        assert torch.equal(value, final["head"][key]), key
    with pytest.raises(ValueError, match="--objective 'histogram' \\(the run used 'classify'\\)"):
        train(replace(cut, resume="auto", objective="histogram"), explicit=["resume", "out", "objective"])


def test_cli_refuses_an_unknown_objective(capsys):
    with pytest.raises(SystemExit):
        main(["--objective", "regress"])
    assert "--objective" in capsys.readouterr().err
    with pytest.raises(ValueError, match="^--objective must be one of"):
        train(TrainConfig(objective="regress", progress=False))
