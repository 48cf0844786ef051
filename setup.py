"""Build of fastnoise and its compiled extension ``fastnoise._C``.

* Always: the C++ CPU kernels (csrc/fastnoise.cpp, csrc/cpu/*.cpp).
* Also the CUDA kernels (csrc/cuda/*.cu) when torch is a CUDA build (torch.version.cuda)
  and a CUDA toolkit is found (CUDA_HOME / nvcc). Default arch list "8.0;9.0+PTX" (SASS for
  sm_80 and sm_90, and compute_90 PTX that newer GPUs compile at load time); set
  TORCH_CUDA_ARCH_LIST to override, MAX_JOBS to bound parallel compile jobs.
  FASTNOISE_NO_CUDA=1 forces a CPU-only build.
* FASTNOISE_NO_EXT=1 compiles nothing (and needs no torch at build time): the Triton and
  reference backends only.

Install with ``pip install --use-pep517 --no-build-isolation -e .`` (torch must already be
installed); ``pip wheel --no-build-isolation --no-deps .`` builds a wheel. A failing C++/CUDA
compile fails the install loudly. A wheel with the extension pins the torch it was built
against (``torch==X.Y.Z``): the compiled code loads only with that torch.

What was built is written to ``fastnoise/_build_info.py`` (``fastnoise.build_info()``,
``python -m fastnoise check``), including why a part was skipped: pip hides a build's output.
Compiled objects are kept in ``build/temp.*`` (keyed by torch version) so that ninja reuses
them: reinstalling (``-e ".[test]"`` after ``-e .``) or building the wheel after an install
relinks instead of compiling again.
"""

import glob
import os
import pprint
import re
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
TORCH_MIN = "torch>=2.11"
# Triton ships wheels for Linux only; elsewhere the triton backend says it is missing.
# numpy: the Triton interpreter (the triton kernels on a CPU, as `check` runs them without a
# GPU) needs it, and torch warns at import without it.
RUNTIME = ['triton>=3.6; sys_platform == "linux"', "numpy"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _version_line(cmd, marker: str = "") -> str:
    """The first line of `cmd`'s output containing `marker` (a compiler's --version)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except Exception as exc:  # noqa: BLE001 (recorded, never fatal: the compile says more)
        return f"unknown ({type(exc).__name__})"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and marker in ln]
    return lines[0] if lines else "unknown"


def _openmp_flag(torch) -> bool:
    """Whether the C++ sources must be compiled with -fopenmp: torch's intra-op parallel
    backend is OpenMP (ATen/Config.h: AT_PARALLEL_OPENMP) and the compiler is GCC-style on
    Linux (torch's Linux wheels ship GNU libgomp)."""
    return (sys.platform.startswith("linux") and torch._C.has_openmp
            and "ATen parallel backend: OpenMP" in torch.__config__.parallel_info())


def _cuda_arch_flags(cpp_extension):
    """The -gencode flags for TORCH_CUDA_ARCH_LIST (default DEFAULT_CUDA_ARCHS), computed by
    torch's own parser and passed explicitly, so that what is recorded is what nvcc gets."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    flags = cpp_extension._get_cuda_arch_flags()
    sass = sorted({m.group(1) for f in flags for m in [re.search(r"code=(sm_\w+)", f)] if m})
    ptx = sorted({m.group(1) for f in flags for m in [re.search(r"code=(compute_\w+)", f)] if m})
    return flags, sass, ptx


def _configure():
    """(ext_modules, cmdclass, install_requires, record): what to build and what it says."""
    record = {"fastnoise": VERSION, "python": sysconfig.get_python_version(),
              "platform": sysconfig.get_platform(), "extension": False,
              "backends_compiled": [], "missing": {}, "torch": None, "torch_cuda": None}
    if _flag("FASTNOISE_NO_EXT"):
        why = "installed with FASTNOISE_NO_EXT=1 (nothing compiled)"
        record["missing"] = {"cpu": why, "cuda": why}
        try:  # informational only: a no-ext build needs no torch
            import torch
            record["torch"] = torch.__version__
        except ImportError:
            pass
        return [], {"build_py": _build_py_writing(record)}, [TORCH_MIN] + RUNTIME, record

    import torch
    from torch.utils import cpp_extension

    cxx = cpp_extension.get_cxx_compiler()
    # -g0: Python's default -g makes debug info for all of torch's headers: ~20 % of the
    # compile time and 99 % of the objects' size (torch's own wheels carry none)
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off", "-fno-fast-math"]
    link_flags = []
    if _openmp_flag(torch):
        # at::parallel_for is a header template: without -fopenmp its `#pragma omp parallel`
        # is dropped and every CPU kernel runs on one thread. libgomp.so.1 then resolves to
        # the one torch has already loaded (same soname): one thread pool, torch's settings.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = (sorted(glob.glob("csrc/*.cpp", root_dir=ROOT))
               + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT)))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))

    cuda_home = cpp_extension.CUDA_HOME
    why_no_cuda = ("FASTNOISE_NO_CUDA=1 was set" if _flag("FASTNOISE_NO_CUDA") else
                   f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
                   if cuda_home is None else None)
    record.update(torch=torch.__version__, torch_cuda=torch.version.cuda, extension=True,
                  cxx=cxx, cxx_version=_version_line([cxx, "--version"]), cxx_flags=cxx_flags,
                  ldflags=link_flags)
    if why_no_cuda is not None:
        # pip hides this line; the record (build_info(), `python -m fastnoise check`) keeps it
        print(f"fastnoise: building the CPU extension only; CUDA kernels skipped "
              f"({why_no_cuda}).", file=sys.stderr)
        record.update(backends_compiled=["cpu"], missing={"cuda": why_no_cuda})
        ext = cpp_extension.CppExtension(
            "fastnoise._C", sources, define_macros=[("FASTNOISE_WITH_CUDA", "0")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    else:
        arch_flags, sass, ptx = _cuda_arch_flags(cpp_extension)
        nvcc_flags = [
            "-O3", "-lineinfo",
            # the contract forbids FMA contraction of e + xi * mag (kernels also use
            # __fmul_rn / __fadd_rn); no --use_fast_math: precise logf/sinf/cosf for the
            # gaussian noise
            "-fmad=false",
        ] + arch_flags
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        record.update(backends_compiled=["cpu", "cuda"],
                      cuda_arch_list=os.environ["TORCH_CUDA_ARCH_LIST"], cuda_sass=sass,
                      cuda_ptx=ptx, nvcc=nvcc,
                      nvcc_version=_version_line([nvcc, "--version"], "release"),
                      nvcc_flags=nvcc_flags)
        ext = cpp_extension.CUDAExtension(
            "fastnoise._C", sources + cuda_sources, define_macros=[("FASTNOISE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags)

    # A compiled extension loads only with the torch it was built against: pin it, as
    # torchvision's and flash-attention's wheels do (the public version: 2.13.0 matches
    # 2.13.0+cpu and 2.13.0+cu130)
    pin = "torch==" + torch.__version__.split("+")[0]
    tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-torch{torch.__version__}"
    if why_no_cuda is None:
        tag += "-cuda"
    cmdclass = {"build_py": _build_py_writing(record),
                "build_ext": _build_ext_writing(record, cpp_extension,
                                                os.path.join(ROOT, "build", f"temp.{tag}"))}
    return [ext], cmdclass, [pin] + RUNTIME, record


def _write_record(record, package_dir: str) -> None:
    os.makedirs(package_dir, exist_ok=True)
    text = ('"""Generated by setup.py at build time: what was compiled (fastnoise.build_info()).'
            '"""\n\nBUILD_INFO = ' + pprint.pformat(record, sort_dicts=False, width=96) + "\n")
    path = os.path.join(package_dir, "_build_info.py")
    try:
        with open(path) as f:
            if f.read() == text:
                return  # keep the mtime: nothing to rebuild
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def _build_py_writing(record):
    class BuildPy(build_py):
        """Also writes fastnoise/_build_info.py (into the wheel; into the checkout for an
        editable install), and drops an extension left in build/ by an earlier build when
        this one compiles none (else a FASTNOISE_NO_EXT wheel would ship it)."""

        def run(self):
            super().run()
            target = os.path.join(self.build_lib, "fastnoise")
            _write_record(record, target)
            if not record["extension"]:
                for stale in glob.glob(os.path.join(target, "_C.*")):
                    os.remove(stale)
            if self.editable_mode:
                _write_record(record, os.path.join(ROOT, "fastnoise"))
    return BuildPy


def _build_ext_writing(record, cpp_extension, build_temp):
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """torch's BuildExtension with a stable object folder (ninja then recompiles only
        what changed) that also writes fastnoise/_build_info.py next to an in-place
        build (`python setup.py build_ext --inplace`, editable installs)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = build_temp

        def run(self):
            super().run()
            if self.inplace or self.editable_mode:
                _write_record(record, os.path.join(ROOT, "fastnoise"))
    return BuildExt


def main():
    ext_modules, cmdclass, install_requires, _ = _configure()
    setup(
        name="fastnoise",
        version=VERSION,
        description="Fused noise-regularized embedding kernels for LLM fine-tuning "
                    "(NEFTune, SymNoise, NoisyTune)",
        packages=find_packages(include=["fastnoise*"]),
        python_requires=">=3.10",
        install_requires=install_requires,
        extras_require={
            # the tests: integration with transformers / PEFT / TRL / DeepSpeed (ZeRO on the
            # CPU through gloo; builds no op at install)
            "test": ["pytest", "pytest-benchmark", "transformers", "peft", "accelerate", "trl",
                     "matplotlib", "deepspeed"],
            # kept for old install lines: triton is a plain dependency now
            "triton": [],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


if __name__ == "__main__":  # (pip's build backend runs this file as __main__ too)
    main()
