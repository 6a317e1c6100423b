"""Build script for s2m_ext.

The extension ``s2m_ext._C`` always contains the CPU kernels. CUDA kernels are added when
a CUDA device is visible to torch and nvcc is found (the pytorch_scatter convention), or
when FORCE_CUDA=1 (for building on a GPU-less machine against a CUDA-enabled torch).
FORCE_ONLY_CPU=1 skips them. TORCH_CUDA_ARCH_LIST is honoured by torch's build helpers;
without it, FORCE_CUDA builds target sm_80 and sm_90.

The CPU kernels are compiled three times in one build on x86-64 with GCC: for the baseline
(SSE2), for AVX2 + FMA and for AVX-512 (csrc/cpu/level_*.cpp); the best level the running
CPU has is chosen when the first kernel runs, so one build (a wheel) is fast everywhere.
S2M_CPU_CAPABILITY=baseline|avx2 at run time forces a lower level. S2M_CPU_FLAGS adds
compiler flags to every C++ file (e.g. "-march=native" for a build that runs only here);
none by default.

Build with the torch you will run with:  pip install --no-build-isolation .
(a wheel: python -m build --no-isolation, which builds the sdist and the wheel from it).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only on a broken setup
    sys.exit(
        "s2m_ext builds against the installed torch: install torch first, then run "
        "'pip install --no-build-isolation .' (" + str(exc) + ")"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.getenv(name, "0") == "1"


def _with_cuda() -> bool:
    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit("FORCE_CUDA=1 needs a CUDA-enabled torch; this torch is " + torch.__version__)
        if CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 needs the CUDA toolkit (nvcc); set CUDA_HOME")
        if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
            sys.exit(
                f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (an nvcc wrapper script on PATH "
                "can mislead torch's guess): set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda"
            )
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _openmp_flags() -> list:
    # ATen's parallel_for is an inline OpenMP region: without -fopenmp it would run serially.
    info = torch.__config__.parallel_info()
    if "backend: OpenMP" in info and "OpenMP not found" not in info and sys.platform != "darwin":
        return ["-fopenmp"]
    return []


def _cpu_flags() -> list:
    return os.getenv("S2M_CPU_FLAGS", "").split()


def extensions():
    with_cuda = _with_cuda()
    if with_cuda and not os.getenv("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    openmp = _openmp_flags()
    define_macros = []
    # -fno-trapping-math lets GCC vectorise the clamps of csrc/cpu's exp (no FP traps are
    # ever enabled; results are unchanged). torch picks the C++ standard it needs.
    extra = {"cxx": ["-O3", "-fno-trapping-math"] + _cpu_flags() + openmp}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("S2M_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    # Every kernel file and header, so that an sdist carries what either build needs.
    depends = sorted(
        f for pattern in ("*.h", "*/*.h", "*/*.cuh", "cuda/*.cu", "cuda/*.cpp", "cuda/*.sh", "cuda/emu/*")
        for f in glob.glob(os.path.join("csrc", pattern))
    )
    return [
        ext_cls(
            name="s2m_ext._C",
            sources=sources,
            depends=depends,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=openmp,
        )
    ]


setup(
    packages=find_packages(include=["s2m_ext", "s2m_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
