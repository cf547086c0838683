"""Build of intl_kernels and its optional C++/CUDA extension ``intl_kernels._C``.

Environment flags (compared to "1"):
  INTL_KERNELS_SKIP_BUILD=1        install the pure-Python package only (backends: torch)
  INTL_KERNELS_SKIP_CUDA_BUILD=1   build the C++ CPU kernels only, even where nvcc is found
  INTL_KERNELS_CUDA_ARCHS="80;90"  CUDA architectures for csrc/*.cu (default 80;90)
  MAX_JOBS=N                       parallel compile jobs (ninja; read by torch's BuildExtension)

The C++ CPU kernels are always built. CUDA sources are compiled only when torch is a
CUDA build and nvcc is found (CUDA_HOME, or the toolkit of the nvcc on PATH) with torch's CUDA
major version; otherwise the build says why and goes on CPU-only.
Install: `pip install --no-build-isolation -e .`
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip() == "1"


def _log(msg: str) -> None:
    print(f"intl_kernels setup: {msg}", flush=True)


def _cuda_home() -> str | None:
    """CUDA_HOME (or CUDA_PATH), else the toolkit of the nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime_api.h")):
        return guess
    # nvcc may be a wrapper script outside its toolkit: ask it where the toolkit is.
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return guess
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return os.path.normpath(line.split("TOP=", 1)[1].strip().strip('"'))
    return guess


def _cuda_disabled_reason(torch) -> str | None:
    """None when CUDA sources can be compiled here, else why not."""
    if _flag("INTL_KERNELS_SKIP_CUDA_BUILD"):
        return "INTL_KERNELS_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    home = _cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if nvcc is None or not os.path.exists(nvcc):
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    release = _nvcc_release(nvcc)
    if release and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch's cpp_extension refuses a CUDA major version other than its own
        return (
            f"nvcc is CUDA {release} but torch was built with CUDA {torch.version.cuda}; "
            "install the torch build of nvcc's CUDA major version (or point CUDA_HOME at a matching toolkit)"
        )
    return None


def _nvcc_release(nvcc: str) -> str | None:
    """nvcc's CUDA release, e.g. "13.0" (None when it cannot be read)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_archs(spec: str) -> list[str]:
    """The architectures of INTL_KERNELS_CUDA_ARCHS ("80;90", commas allowed), e.g. ["80", "90"]."""
    return [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]


def gencode_flags(archs: list[str]) -> list[str]:
    """A cubin per architecture, and the PTX of the highest one beside them: GPUs newer than
    every cubin JIT-compile it at load instead of failing with "no kernel image"."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if archs:
        top = max(archs, key=lambda a: int("".join(ch for ch in a if ch.isdigit()) or 0))
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def _ext_modules():
    if _flag("INTL_KERNELS_SKIP_BUILD"):
        _log("INTL_KERNELS_SKIP_BUILD=1: pure-Python install, no intl_kernels._C")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # No FMA contraction: the CPU kernels promise bitwise-equal results for every input layout,
    # and a contracted (x − z0)·s − m in one loop but not another would break that on targets
    # with FMA in their baseline (aarch64). -g0 drops the debug info Python's CFLAGS ask for
    # (-g): a third of the compile time and most of the library's size.
    cxx_flags = ["-O3", "-ffp-contract=off", "-g0"]
    reason = _cuda_disabled_reason(torch) if cuda_sources else "no CUDA sources"
    if reason is None:
        os.environ.setdefault("CUDA_HOME", _cuda_home())
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        archs = cuda_archs(os.environ.get("INTL_KERNELS_CUDA_ARCHS", "80;90"))
        # No --use_fast_math: it flushes subnormals to zero, and tiny inputs must give the
        # same results as on the other backends.
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + gencode_flags(archs)
        _log(f"building C++ and CUDA kernels for sm {archs}")
        ext = cpp_extension.CUDAExtension(
            "intl_kernels._C",
            cpp_sources + cuda_sources,
            include_dirs=[CSRC],
            define_macros=[("INTL_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        _log(f"building C++ CPU kernels only ({reason})")
        ext = cpp_extension.CppExtension(
            "intl_kernels._C", cpp_sources, include_dirs=[CSRC], extra_compile_args={"cxx": cxx_flags}
        )
    return [ext], {"build_ext": _build_ext_class(cpp_extension.BuildExtension)}


def _build_ext_class(base):
    class BuildExt(base):
        """Objects go to build/temp in the source tree so rebuilds (also editable) are incremental."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

    return BuildExt.with_options(use_ninja=True)


if __name__ == "__main__":  # also how setuptools' PEP 517 backend runs this file
    ext_modules, cmdclass = _ext_modules()
    setup(
        # train/ ships as intl_kernels.train (no top-level "train" package in site-packages).
        packages=find_packages(include=["intl_kernels", "intl_kernels.*", "python_ref", "python_ref.*"])
        + ["intl_kernels.train"],
        package_dir={"intl_kernels.train": "train"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
