"""Log-log plots of the sweeps: median time (top row) and peak memory (bottom row) against
each swept size, one line per contender, one PNG per workload."""

from __future__ import annotations

from typing import Dict, List, Sequence

from .contenders import CONTENDERS
from .workloads import SWEEP_FIELDS

MARKERS = {"s2m_ext": "o", "reference": "s", "compiled": "^", "sklearn": "D", "torch_loop": "v", "gmm_gpu": "P"}


def sweep_series(records: List[Dict[str, object]], workload: str, field: str, name: str, key: str):
    """(sizes, values) of contender ``name`` along the sweep of ``field`` (measured points only)."""
    points = []
    for rec in records:
        if rec["workload"] != workload or f"sweep:{field}" not in rec["tags"]:
            continue
        entry = rec["contenders"].get(name, {})  # type: ignore[union-attr]
        if key in entry and entry[key]:
            points.append((rec["shape"][field], entry[key]))  # type: ignore[index]
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def plot_sweeps(records: List[Dict[str, object]], contenders: Sequence[str], stem: str, device: str) -> List[str]:
    """Write ``<stem>-<workload>.png`` per workload with sweeps; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for workload, fields in SWEEP_FIELDS.items():
        fields = [f for f in fields if any(f"sweep:{f}" in r["tags"] and r["workload"] == workload for r in records)]
        if not fields:
            continue
        fig, axes = plt.subplots(2, len(fields), figsize=(2.4 * len(fields) + 1.2, 4.6), squeeze=False)
        for col, field in enumerate(fields):
            for row, (key, unit, scale) in enumerate((("median_s", "time per call (s)", 1.0),
                                                       ("peak_mem_bytes", "peak memory (MB)", 1e-6))):
                ax = axes[row][col]
                for name in contenders:
                    xs, ys = sweep_series(records, workload, field, name, key)
                    if xs:
                        ax.loglog(xs, [y * scale for y in ys], marker=MARKERS.get(name, "."), ms=3, lw=1,
                                  label=CONTENDERS[name].title)
                ax.set_xscale("log", base=2)
                ax.tick_params(labelsize=6)
                ax.grid(True, which="major", lw=0.3)
                if row == 1:
                    ax.set_xlabel(field, fontsize=7)
                if col == 0:
                    ax.set_ylabel(unit, fontsize=7)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes.flat:  # a contender missing from the first panel still gets a legend entry
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=7, frameon=False)
        fig.suptitle(f"{workload} on {device}: sweeps around the base shape", fontsize=8, y=0.93)
        fig.tight_layout(rect=(0, 0, 1, 0.9))
        path = f"{stem}-{workload}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        paths.append(path)
    return paths
