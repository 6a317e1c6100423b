"""Static performance report of the CUDA kernels, from nvcc's output alone (no GPU).

Run through ``csrc/cuda/check_nvcc.sh --report OUT.md``, which compiles the kernels with
``-lineinfo -Xptxas -v``, disassembles them with ``nvdisasm -gi`` and runs ``static_shapes``.
Inputs (all in the build folder): ``*.ptxas.log``, ``*.<arch>.sass`` and ``shapes.tsv``.

What it derives:
  * per kernel instantiation and architecture: registers, stack, spill stores/loads, static
    shared memory (ptxas -v);
  * per benchmark shape: the dynamic shared memory of the launched instantiation and the
    resident blocks per SM from the occupancy formula (registers, shared memory, threads,
    blocks), with the per-architecture limits below;
  * the SASS of the EM inner loops: a loop is a backward branch's range [target, branch]; each
    loop of interest is found by a marker comment ``// sass-loop: NAME`` on the source line of
    its per-element FMA: the smallest loop holding that line's FFMA/DFMA instructions is the
    inner loop, and the number of those FMAs is the number of (n, k, d) elements one trip
    handles. Issue slots per element = instructions in the loop / elements per trip (one SASS
    instruction takes one issue slot of its warp scheduler).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import pathlib
import re
import subprocess
import sys

# Per-SM limits (CUDA occupancy calculator / programming guide, compute capability 8.0 and 9.0).
ARCH_LIMITS = {
    "sm_80": {"regs": 65536, "reg_unit": 256, "max_warps": 64, "max_blocks": 32,
              "smem": 167936, "smem_reserved": 1024, "smem_unit": 128},
    "sm_90": {"regs": 65536, "reg_unit": 256, "max_warps": 64, "max_blocks": 32,
              "smem": 233472, "smem_reserved": 1024, "smem_unit": 128},
}
FMA_OPS = ("FFMA", "DFMA")
FP_OPS = ("FFMA", "FADD", "FMUL", "FMNMX", "DFMA", "DADD", "DMUL", "MUFU", "FSEL", "FSETP",
          "DSETP", "HFMA2")
SHARED_LOADS = ("LDS",)
GENERIC_LOADS = ("LD",)
GLOBAL_LOADS = ("LDG",)


@dataclasses.dataclass
class Kernel:
    name: str
    arch: str
    regs: int = 0
    stack: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    smem: int = 0


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    simple = {}
    for raw, pretty in zip(names, out):
        pretty = re.sub(r"s2m::cuda::(\(anonymous namespace\)::)?", "", pretty)
        simple[raw] = re.sub(r"\(.*", "", pretty).replace("void ", "")
    return simple


def parse_ptxas(logs: list[pathlib.Path]) -> list[Kernel]:
    kernels = []
    cur = None
    for log in logs:
        for line in log.read_text().splitlines():
            m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
            if m:
                cur = Kernel(m.group(1), m.group(2))
                kernels.append(cur)
                continue
            if cur is None:
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                          line)
            if m:
                cur.stack, cur.spill_st, cur.spill_ld = map(int, m.groups())
            m = re.search(r"Used (\d+) registers", line)
            if m:
                cur.regs = int(m.group(1))
                s = re.search(r"(\d+) bytes smem", line)
                cur.smem = int(s.group(1)) if s else 0
    names = demangle(sorted({k.name for k in kernels}))
    for k in kernels:
        k.name = names[k.name]
    return kernels


def blocks_per_sm(arch: str, regs: int, smem_bytes: int, threads: int) -> tuple[int, str]:
    """Resident blocks per SM and the limiting resource."""
    lim = ARCH_LIMITS[arch]
    warps = math.ceil(threads / 32)
    reg_per_warp = math.ceil(regs * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by = {
        "registers": (lim["regs"] // reg_per_warp) // warps,
        "threads": lim["max_warps"] // warps,
        "blocks": lim["max_blocks"],
    }
    smem = math.ceil((smem_bytes + lim["smem_reserved"]) / lim["smem_unit"]) * lim["smem_unit"]
    by["shared memory"] = lim["smem"] // smem
    n = min(by.values())
    return n, "/".join(k for k, v in by.items() if v == n)


@dataclasses.dataclass
class Instr:
    addr: int
    op: str
    text: str
    lines: frozenset  # (file name, line) of every level of its inlining chain


def parse_sass(path: pathlib.Path) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    """Function name -> (instructions, label -> address), from nvdisasm -gi output."""
    funcs: dict[str, tuple[list[Instr], dict[str, int]]] = {}
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    loc = None
    group_first = True
    for raw in path.read_text().splitlines():
        line = raw.strip()
        m = re.match(r"\.text\.(\S+):$", line)
        if m:
            instrs, labels, pending_labels = [], {}, []
            funcs[m.group(1)] = (instrs, labels)
            continue
        if line.startswith("//## File"):
            # A group of these precedes an instruction: its inlining chain, innermost first.
            if group_first:
                loc = frozenset()
            loc = loc | {(pathlib.Path(f).name, int(n))
                         for f, n in re.findall(r'"([^"]+)", line (\d+)', line)}
            group_first = False
            continue
        m = re.match(r"(\.L_x_\d+):$", line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = re.match(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            group_first = True
            addr = int(m.group(1), 16)
            body = m.group(2).strip()
            op_text = re.sub(r"^@!?U?P\w+\s+", "", body)
            op = op_text.split()[0] if op_text else ""
            for lab in pending_labels:
                labels[lab] = addr
            pending_labels = []
            instrs.append(Instr(addr, op, body, loc or frozenset()))
    return funcs


def loops_of(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    loops = []
    for ins in instrs:
        if ins.op.startswith("BRA"):
            m = re.search(r"`\((\.L_x_\d+)\)", ins.text)
            if m and m.group(1) in labels and labels[m.group(1)] <= ins.addr:
                loops.append((labels[m.group(1)], ins.addr))
    return loops


def base_op(op: str) -> str:
    return op.split(".")[0]


def classify(body: list[Instr]) -> dict[str, int]:
    c = collections.Counter()
    for ins in body:
        op = base_op(ins.op)
        if op in FP_OPS:
            c["fp"] += 1
        elif op in SHARED_LOADS:
            c["LDS"] += 1
        elif op in GENERIC_LOADS:
            c["LD (generic)"] += 1
        elif op in GLOBAL_LOADS:
            c["LDG"] += 1
        else:
            c["other"] += 1
    return c


def marker_lines(src_dir: pathlib.Path) -> dict[tuple[str, int], str]:
    marks = {}
    for src in sorted(src_dir.glob("*.cu")):
        for i, text in enumerate(src.read_text().splitlines(), 1):
            m = re.search(r"// sass-loop: ([\w-]+)", text)
            if m:
                marks[(src.name, i)] = m.group(1)
    return marks


@dataclasses.dataclass
class Loop:
    kernel: str
    arch: str
    marker: str
    slots: int
    elems: int
    mix: dict[str, int]

    @property
    def per_elem(self) -> float:
        return self.slots / self.elems


def inner_loops(sass_files: list[pathlib.Path], marks: dict[tuple[str, int], str],
                names: dict[str, str]) -> list[Loop]:
    found = []
    for path in sass_files:
        arch = re.search(r"(sm_\d+)", path.name).group(1)
        for fn, (instrs, labels) in parse_sass(path).items():
            loops = loops_of(instrs, labels)
            by_loop: dict[tuple[tuple[int, int], str], int] = collections.Counter()
            for ins in instrs:
                hits = [marks[x] for x in ins.lines if x in marks]
                if base_op(ins.op) not in FMA_OPS or not hits:
                    continue
                holding = [lp for lp in loops if lp[0] <= ins.addr <= lp[1]]
                if holding:
                    smallest = min(holding, key=lambda lp: lp[1] - lp[0])
                    by_loop[(smallest, hits[0])] += 1
            # The main loop of each marker: the one doing the most elements per trip.
            best: dict[str, tuple[int, tuple[int, int]]] = {}
            for (lp, mark), n in by_loop.items():
                if mark not in best or n > best[mark][0]:
                    best[mark] = (n, lp)
            for mark, (n, lp) in best.items():
                body = [i for i in instrs if lp[0] <= i.addr <= lp[1]]
                found.append(Loop(names.get(fn, fn), arch, mark, len(body), n, classify(body)))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", required=True, type=pathlib.Path)
    ap.add_argument("--src", required=True, type=pathlib.Path)
    ap.add_argument("--nvcc-version", required=True)
    ap.add_argument("--out", required=True, type=pathlib.Path)
    args = ap.parse_args()

    kernels = parse_ptxas(sorted(args.build.glob("*.ptxas.log")))
    by_name = {(k.name, k.arch): k for k in kernels}
    sass_files = sorted(args.build.glob("*.sass"))
    raw_names = set()
    for p in sass_files:
        raw_names |= set(re.findall(r"^\.text\.(\S+):$", p.read_text(), re.MULTILINE))
    names = demangle(sorted(raw_names))
    loops = inner_loops(sass_files, marker_lines(args.src), names)
    shapes = [line.split("\t") for line in (args.build / "shapes.tsv").read_text().splitlines()
              if line.strip()]

    out = []
    w = out.append
    w("# CUDA kernels: static performance report")
    w("")
    w(f"Generated by `bash csrc/cuda/check_nvcc.sh --report OUT.md` (no GPU). Compiler: {args.nvcc_version}.")
    w("Flags: `-std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Xptxas -v`, sm_80 and sm_90.")
    w("")
    w("## Resources per kernel instantiation (ptxas -v)")
    w("")
    w("Blocks/SM here count registers and threads only (256 threads a block, no shared memory);")
    w("the shapes table below adds the shared memory of each launch.")
    w("")
    w("| kernel | arch | registers | stack B | spill stores B | spill loads B | static smem B | blocks/SM (regs, 256 thr) |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        n, _ = blocks_per_sm(k.arch, k.regs, k.smem, 256)
        w(f"| `{k.name}` | {k.arch} | {k.regs} | {k.stack} | {k.spill_st} | {k.spill_ld} | {k.smem} | {n} |")
    spills = [k for k in kernels if k.spill_st or k.spill_ld]
    w("")
    w(f"Kernels with spills: {len(spills)} of {len(kernels)}"
      + (" (" + ", ".join(sorted({f'`{k.name}` {k.arch}' for k in spills})) + ")" if spills else "") + ".")
    em = [k for k in kernels if k.name.startswith("em_") and "<float" in k.name]
    if em:
        w(f"Float EM kernels: registers {min(k.regs for k in em)}-{max(k.regs for k in em)}, "
          f"spill bytes {sum(k.spill_st + k.spill_ld for k in em)}.")
    w("")
    w("## Occupancy at the benchmark shapes (float)")
    w("")
    w("Dynamic shared memory is what the launch asks for at that shape under the architecture's")
    w("per-block opt-in limit (csrc/cuda/report/static_shapes.cpp). Per-SM limits used: "
      + "; ".join(f"{a}: {v['regs']} registers (allocated per warp in units of {v['reg_unit']}), "
                  f"{v['max_warps']} warps, {v['max_blocks']} blocks, {v['smem']} B shared memory "
                  f"(+{v['smem_reserved']} B reserved a block, units of {v['smem_unit']} B)"
                  for a, v in ARCH_LIMITS.items()) + ".")
    w("")
    w("| kernel | shape | arch | registers | static + dynamic smem B | threads | blocks/SM | limited by |")
    w("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for kname, shape, arch, dyn, threads in shapes:
        k = by_name.get((kname, arch))
        if k is None:
            w(f"| `{kname}` | {shape} | {arch} | ? | {dyn} | {threads} | ? | not compiled |")
            continue
        total = k.smem + int(dyn)
        if int(threads) == 0:
            w(f"| `{kname}` | {shape} | {arch} | {k.regs} | {total} | 0 | 0 | does not fit |")
            continue
        n, why = blocks_per_sm(arch, k.regs, total, int(threads))
        w(f"| `{kname}` | {shape} | {arch} | {k.regs} | {total} | {threads} | {n} | {why} |")
    w("")
    w("## SASS of the EM inner loops")
    w("")
    w("Per loop: SASS instructions of one trip (issue slots), (n, k, d) elements per trip (the")
    w("marked per-element FMAs in it), slots per element, and the instruction mix (fp: FFMA/FADD/")
    w("FMUL/MUFU and double equivalents; LDS: shared loads; LD: generic loads; LDG: global loads).")
    w("Markers: estep = Mahalanobis sums (E-step, forward and backward); mstep-mean, mstep-var =")
    w("the M-step's weighted sums (mstep-var is also the backward's second moment); bwd-moment,")
    w("bwd-logdens = the backward's sums over d and over n.")
    w("")
    w("| kernel | arch | loop | slots/trip | elements/trip | slots/element | mix |")
    w("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for lp in sorted(loops, key=lambda x: (x.kernel, x.arch, x.marker)):
        mix = ", ".join(f"{k} {v}" for k, v in sorted(lp.mix.items()))
        w(f"| `{lp.kernel}` | {lp.arch} | {lp.marker} | {lp.slots} | {lp.elems} | {lp.per_elem:.2f} | {mix} |")
    w("")
    w("### Per EM iteration (forward: E-step + weighted mean + weighted variance)")
    w("")
    w("| kernel | arch | slots per (n, k, d) element per iteration |")
    w("| --- | --- | ---: |")
    per_kernel = collections.defaultdict(dict)
    for lp in loops:
        per_kernel[(lp.kernel, lp.arch)][lp.marker] = lp.per_elem
    for (kname, arch), m in sorted(per_kernel.items()):
        if not kname.startswith("em_forward"):
            continue
        parts = [m.get(x) for x in ("estep", "mstep-mean", "mstep-var")]
        if None in parts:
            w(f"| `{kname}` | {arch} | incomplete: {sorted(m)} |")
            continue
        w(f"| `{kname}` | {arch} | {sum(parts):.2f} ({' + '.join(f'{p:.2f}' for p in parts)}) |")
    w("")
    args.out.write_text("\n".join(out) + "\n")
    print(f"static_report: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
