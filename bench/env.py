"""What a result was measured on: device and CPU model, library versions, git commit, load."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from typing import Dict, Optional, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: float32 (non-tensor-core) peak FLOP/s and DRAM bandwidth (bytes/s) of GPUs, from the
#: vendors' data sheets; the first name fragment found in the device name wins.
GPU_PEAKS: Tuple[Tuple[str, float, float], ...] = (
    ("H200", 67e12, 4.8e12),
    ("H100 PCIe", 51e12, 2.0e12),
    ("H100 NVL", 60e12, 3.9e12),
    ("H100", 67e12, 3.35e12),  # SXM5
    ("A100-PCIE-40GB", 19.5e12, 1.555e12),
    ("A100-SXM4-40GB", 19.5e12, 1.555e12),
    ("A100", 19.5e12, 2.039e12),  # 80 GB
    ("L40S", 91.6e12, 0.864e12),
    ("A10", 31.2e12, 0.6e12),
    ("T4", 8.1e12, 0.32e12),
)


def gpu_peaks(name: str) -> Optional[Tuple[float, float]]:
    """(float32 FLOP/s, bytes/s) for a CUDA device name, or None when unknown."""
    for fragment, flops, bandwidth in GPU_PEAKS:
        if fragment.lower() in name.lower():
            return flops, bandwidth
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except OSError:
        return None


def git_commit() -> Dict[str, object]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "branch": None, "dirty": None}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: str) -> Dict[str, object]:
    """Everything needed to read a result file later."""
    import s2m_ext

    info: Dict[str, object] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "mem_available_bytes": mem_available_bytes(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "s2m_ext_build": s2m_ext.build_info(),
        "numpy": _version("numpy"),
        "scikit-learn": _version("scikit-learn"),
        "gmm-gpu": _version("gmm-gpu"),
        "git": git_commit(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["device_name"] = props.name
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda_runtime"] = torch.version.cuda
        info["gpu_peaks"] = gpu_peaks(props.name)
    else:
        info["device_name"] = info["cpu_model"]
    return info
