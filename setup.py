"""Build of fastnoise and its compiled extension ``fastnoise._C``.

* Always: the C++ CPU kernels (csrc/fastnoise.cpp, csrc/cpu/*.cpp).
* Also the CUDA kernels (csrc/cuda/*.cu) when torch is a CUDA build (torch.version.cuda)
  and a CUDA toolkit is found (CUDA_HOME / nvcc). Default arch list "8.0;9.0"; set
  TORCH_CUDA_ARCH_LIST to override, MAX_JOBS to bound parallel compile jobs.
  FASTNOISE_NO_CUDA=1 forces a CPU-only build.

Install with ``pip install --use-pep517 --no-build-isolation -e .`` (torch must already be installed).
A failing C++/CUDA compile fails the install loudly.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _openmp_flag(torch) -> bool:
    """Whether the C++ sources must be compiled with -fopenmp: torch's intra-op parallel
    backend is OpenMP (ATen/Config.h: AT_PARALLEL_OPENMP) and the compiler is GCC-style on
    Linux (torch's Linux wheels ship GNU libgomp)."""
    return (sys.platform.startswith("linux") and torch._C.has_openmp
            and "ATen parallel backend: OpenMP" in torch.__config__.parallel_info())


def _extensions():
    from torch.utils import cpp_extension
    import torch

    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
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

    want_cuda = os.environ.get("FASTNOISE_NO_CUDA", "0") in ("", "0")
    cuda_home = cpp_extension.CUDA_HOME
    build_cuda = want_cuda and torch.version.cuda is not None and cuda_home is not None
    if not build_cuda:
        why = ("FASTNOISE_NO_CUDA is set" if not want_cuda else
               "torch is a CPU-only build" if torch.version.cuda is None else
               "no CUDA toolkit found (set CUDA_HOME)")
        print(f"fastnoise: building the CPU extension only; CUDA kernels skipped ({why}).",
              file=sys.stderr)
        return [cpp_extension.CppExtension(
            "fastnoise._C", sources,
            define_macros=[("FASTNOISE_WITH_CUDA", "0")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc_flags = [
        "-O3", "-lineinfo",
        # the contract forbids FMA contraction of e + xi * mag (kernels also use __fmul_rn /
        # __fadd_rn); no --use_fast_math: precise logf/sinf/cosf for the gaussian noise
        "-fmad=false",
    ]
    return [cpp_extension.CUDAExtension(
        "fastnoise._C", sources + cuda_sources,
        define_macros=[("FASTNOISE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)]


def _cmdclass():
    from torch.utils import cpp_extension
    return {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


setup(
    name="fastnoise",
    version="0.1.0",
    description="Fused noise-regularized embedding kernels for LLM fine-tuning "
                "(NEFTune, SymNoise, NoisyTune)",
    packages=find_packages(include=["fastnoise*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        # triton: its kernels are tested on the CPU through the Triton interpreter
        "test": ["pytest", "pytest-benchmark", "transformers", "peft", "accelerate", "trl",
                 "matplotlib", "numpy", "triton>=3.6",
                 # ZeRO tests on the CPU (its CPU accelerator, gloo); builds no op at install
                 "deepspeed"],
        "triton": ["triton>=3.6"],
    },
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)
