"""Mutation testing: apply each mutation of ``mutations.py`` alone to a copy of the tree,
rebuild the extension when a csrc file changed, run the mutation's test files and report
whether the suite kills it (a test fails) or lets it survive.

    python tests/mutation/run.py [--only ID,ID [--order]] [--tag NAME] [--out DIR] [--timeout S] [--keep]

The copy is a detached ``git worktree`` of HEAD in a temporary folder (the working tree is
never edited); it is built once, CPU only, and each csrc mutation is rebuilt in place
incrementally (ninja recompiles only the objects that include the changed file). Prints a
table and writes ``<out>/mutation-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]


def load_mutations() -> List[dict]:
    spec = importlib.util.spec_from_file_location("mutations", Path(__file__).with_name("mutations.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTATIONS


def check(mutations: List[dict], tree: Path) -> None:
    """Every ``old`` occurs exactly once in its file; ids are unique; test files exist."""
    ids = [m["id"] for m in mutations]
    if len(ids) != len(set(ids)):
        raise SystemExit(f"duplicate mutation ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    for m in mutations:
        count = (tree / m["file"]).read_text().count(m["old"])
        if count != 1:
            raise SystemExit(f"{m['id']}: the old string occurs {count} times in {m['file']} (must be once)")
        for t in m["tests"]:
            if not (tree / t).exists():
                raise SystemExit(f"{m['id']}: no test file {t}")


def build(tree: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree, env=env,
                          capture_output=True, text=True)


def reuse_build(tree: Path) -> bool:
    """Copy the working tree's built extension into the copy when its csrc/ is HEAD's (so the
    library is the one HEAD builds): Python mutations then need no build at all; the first csrc
    mutation builds the copy in full, the later ones incrementally."""
    libs = sorted((ROOT / "s2m_ext").glob("_C*.so"))
    same = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "setup.py"], cwd=ROOT).returncode == 0
    newest_src = max(p.stat().st_mtime for p in (ROOT / "csrc").rglob("*") if p.is_file())
    if not (libs and same and libs[-1].stat().st_mtime > newest_src):
        return False
    shutil.copy2(libs[-1], tree / "s2m_ext" / libs[-1].name)
    return True


def run_tests(tree: Path, files: List[str], env: Dict[str, str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *files]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "killed", "how": f"timeout after {timeout:.0f} s", "failed": [],
                "seconds": round(time.monotonic() - start, 1)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    seconds = round(time.monotonic() - start, 1)
    if done.returncode == 0:
        return {"status": "survived", "how": "all tests passed", "failed": [], "seconds": seconds}
    if done.returncode == 1:
        return {"status": "killed", "how": "test failed", "failed": failed, "seconds": seconds}
    # 2..5: interrupted, internal error, usage error, nothing collected: not a verdict on the code.
    return {"status": "error", "how": f"pytest exit {done.returncode}: {done.stdout[-500:]}{done.stderr[-500:]}",
            "failed": failed, "seconds": seconds}


def write_report(results: List[dict], out: Path, tag: str) -> str:
    """Write ``mutation-<date>[-tag].json`` and ``.md`` under ``out``; returns the table."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d") + (f"-{tag}" if tag else "")
    out.mkdir(parents=True, exist_ok=True)
    killed = sum(r["status"] == "killed" for r in results)
    survived = [r["id"] for r in results if r["status"] == "survived"]
    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
              "killed": killed, "survived": survived, "errors": [r["id"] for r in results if r["status"] == "error"],
              "results": results}
    (out / f"mutation-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Mutation run of {commit[:12]} ({report['date']}): {killed} killed, {len(survived)} survived, "
             f"{len(report['errors'])} errors, of {len(results)}.", "",
             "| status | id | file | failing tests (first) | why |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['status']} | {r['id']} | {r['file']} | {', '.join(r['failed'][:2]) or r['how']} | {r['why']} |")
    table = "\n".join(lines) + "\n"
    (out / f"mutation-{stamp}.md").write_text(table)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated mutation ids (default: all)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "mutation"), help="report folder")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's test run")
    p.add_argument("--tag", default="", help="suffix of the report's file names")
    p.add_argument("--order", action="store_true", help="run in the listed order (default: Python mutations first)")
    p.add_argument("--keep", action="store_true", help="keep the temporary worktree")
    args = p.parse_args(argv)

    mutations = load_mutations()
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {m["id"] for m in mutations}
        if unknown:
            raise SystemExit(f"unknown mutation ids: {sorted(unknown)}")
        mutations = [next(m for m in mutations if m["id"] == i) for i in wanted]
    # Python mutations first: the extension is then rebuilt only between csrc ones.
    if not args.order:
        mutations.sort(key=lambda m: m["file"].startswith("csrc/"))

    tmp = Path(tempfile.mkdtemp(prefix="s2m-mutation-"))
    tree = tmp / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True,
                   capture_output=True)
    env = dict(os.environ, FORCE_ONLY_CPU="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"), PYTHONPATH=str(tree),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    results = []
    try:
        check(mutations, tree)
        built = reuse_build(tree)
        if not built:
            print(f"building the copy in {tree} ...", flush=True)
            b = build(tree, env)
            if b.returncode != 0:
                raise SystemExit(f"the unmutated copy does not build:\n{b.stderr[-3000:]}")
        for m in mutations:
            path = tree / m["file"]
            original = path.read_text()
            path.write_text(original.replace(m["old"], m["new"], 1))
            try:
                if m["file"].startswith("csrc/"):
                    b = build(tree, env)
                    if b.returncode != 0:  # a mutation that does not compile is no bug a test must catch
                        result = {"status": "error", "how": "does not compile", "failed": [], "seconds": 0.0}
                    else:
                        result = run_tests(tree, m["tests"], env, args.timeout)
                else:
                    result = run_tests(tree, m["tests"], env, args.timeout)
            finally:
                path.write_text(original)
            row = {k: m[k] for k in ("id", "file", "why", "tests")} | result
            results.append(row)
            print(f"{row['status']:9s} {row['id']:32s} {row['seconds']:7.1f}s  {' '.join(row['failed'])[:100]}",
                  flush=True)
            write_report(results, Path(args.out), args.tag)
    finally:
        if not args.keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)

    print(write_report(results, Path(args.out), args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
