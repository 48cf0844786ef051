"""What was built, and whether the compiled extension ``fastnoise._C`` may load here.

``setup.py`` writes ``fastnoise/_build_info.py`` when it builds: the backends it compiled,
the CUDA archs (SASS and PTX), the torch, compilers and flags it used, and why a part is
missing (a CPU-only torch, no CUDA toolkit, ``FASTNOISE_NO_EXT=1``). pip hides a build's
output; this record keeps it.

A compiled extension loads only with the torch it was built against (C++ symbols of libtorch
change between releases). Before loading ``fastnoise._C`` the recorded torch is compared
with the running one, so another torch gets one sentence saying so (an import-time warning,
and the reason the ``cpu`` / ``cuda`` backends give), never an undefined-symbol traceback.
On a GPU, :func:`cuda_arch_problem` decides from the recorded archs whether the device can
run the kernels (SASS of its major and a minor <= its own, or PTX of an arch <= its own).
"""

from __future__ import annotations

import importlib
import re
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = ["build_info", "format_build_info", "recorded", "torch_mismatch",
           "extension_problem", "load_extension",
           "cuda_arch_problem", "cuda_device_problem", "ExtensionMismatchWarning",
           "REBUILD_HINT", "REBUILD_CMD"]

REBUILD_CMD = "`pip install --use-pep517 --no-build-isolation -e .`"
REBUILD_HINT = (f"{REBUILD_CMD} in the fastnoise checkout (needs a C++ compiler; the CUDA "
                "kernels also need nvcc and a CUDA build of torch)")


class ExtensionMismatchWarning(UserWarning):
    """fastnoise's compiled extension was built for another torch than the running one."""


def recorded() -> Optional[dict]:
    """The build record written by setup.py, or None (a checkout never built, or built
    before builds were recorded)."""
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def _base(version: str) -> str:
    return version.split("+")[0]


def _cuda_major(version: Optional[str]) -> Optional[str]:
    return None if version is None else version.split(".")[0]


def torch_mismatch(record: Optional[dict] = None, torch_version: Optional[str] = None,
                   torch_cuda: Optional[str] = "<running>") -> Optional[str]:
    """The sentence saying that the extension was built for another torch, or None.

    Same public version (2.13.0 for 2.13.0+cpu and 2.13.0+cu130) is compatible, except that
    an extension with CUDA kernels needs a CUDA torch of the same CUDA major version."""
    record = recorded() if record is None else record
    if not record or not record.get("extension") or not record.get("torch"):
        return None
    running = torch.__version__ if torch_version is None else torch_version
    running_cuda = torch.version.cuda if torch_cuda == "<running>" else torch_cuda
    built = record["torch"]
    with_cuda = "cuda" in record.get("backends_compiled", ())
    if _base(built) == _base(running) and (
            not with_cuda or _cuda_major(record.get("torch_cuda")) == _cuda_major(running_cuda)):
        return None
    running_desc = running + ("" if not with_cuda or running_cuda is None
                              else f" (CUDA {running_cuda})")
    built_desc = built + (f" (CUDA {record.get('torch_cuda')})" if with_cuda else "")
    return (f"fastnoise's compiled extension was built for torch {built_desc} but torch "
            f"{running_desc} is running, so its 'cpu' and 'cuda' backends are off (triton "
            f"and reference still work): install torch=={_base(built)}, or rebuild fastnoise "
            f"against this torch with {REBUILD_CMD}.")


def extension_problem(record: Optional[dict] = None) -> Optional[str]:
    """Why ``fastnoise._C`` must not be loaded, from the build record alone: nothing was
    compiled (FASTNOISE_NO_EXT=1), or another torch runs. None: try loading it."""
    record = recorded() if record is None else record
    if record is not None and not record.get("extension"):
        why = record.get("missing", {}).get("cpu", "no extension was compiled")
        return (f"fastnoise was {why}, so it has no 'cpu' or 'cuda' backend (triton and "
                f"reference work); to compile them reinstall without FASTNOISE_NO_EXT: "
                f"{REBUILD_HINT}")
    return torch_mismatch(record)


_LOADED: Dict[str, object] = {}


def load_extension() -> Tuple[Optional[object], Optional[str]]:
    """``(fastnoise._C, None)``, or ``(None, why it is unavailable)``. Loaded once."""
    if not _LOADED:
        problem = extension_problem()
        if problem is not None:
            _LOADED.update(module=None, error=problem)
        else:
            try:  # loading the .so registers torch.ops.fastnoise.*
                _LOADED.update(module=importlib.import_module("fastnoise._C"), error=None)
            except Exception as exc:  # not built (ImportError), or a broken build
                error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, ModuleNotFoundError) and recorded() is None:
                    error = f"it is not built: run {REBUILD_HINT}"
                else:
                    error = f"it failed to load ({error}); rebuild it: {REBUILD_HINT}"
                _LOADED.update(module=None, error=error)
    return _LOADED["module"], _LOADED["error"]


_ARCH = re.compile(r"^(sm|compute)_(\d+)([a-z]?)$")


def _arch(code: str) -> Tuple[int, int, str]:
    """"sm_90" -> (9, 0, ""), "compute_120" -> (12, 0, ""), "sm_90a" -> (9, 0, "a")."""
    m = _ARCH.match(code)
    if m is None:
        raise ValueError(f"not a CUDA arch code: {code!r}")
    num = int(m.group(2))
    return num // 10, num % 10, m.group(3)


def cuda_arch_problem(sass: Sequence[str], ptx: Sequence[str], capability: Tuple[int, int],
                      device: str = "a device") -> Optional[str]:
    """Whether kernels built as ``sass`` (e.g. ["sm_80", "sm_90"]) and ``ptx`` (e.g.
    ["compute_90"]) run on a device of compute ``capability`` (major, minor): None if they
    do, else why not.

    A cubin for sm_XY runs on X.Z for Z >= Y (same major); an arch-specific one (sm_90a)
    only on X.Y itself. PTX for compute_XY is compiled by the driver for any device >= X.Y;
    arch-specific PTX (compute_90a) only for X.Y. ``device`` names the device in the answer.
    """
    major, minor = int(capability[0]), int(capability[1])
    for code in sass:
        a_major, a_minor, suffix = _arch(code)
        if a_major == major and (a_minor == minor if suffix else a_minor <= minor):
            return None
    for code in ptx:
        a_major, a_minor, suffix = _arch(code)
        if ((a_major, a_minor) == (major, minor) if suffix
                else (a_major, a_minor) <= (major, minor)):
            return None
    built = ", ".join(list(sass) + [f"{p} (PTX)" for p in ptx]) or "no arch"
    return (f"the fastnoise CUDA kernels were built for {built}, which cannot run on "
            f"{device} of compute capability {major}.{minor} (no kernel image): rebuild them "
            f"for it with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" set: {REBUILD_CMD}")


_DEVICE_PROBLEMS: Dict[int, Optional[str]] = {}


def cuda_device_problem(device) -> Optional[str]:
    """:func:`cuda_arch_problem` for a CUDA device, from the build record; cached per device.
    None when the record does not list archs (built before they were recorded)."""
    device = torch.device(device)
    index = device.index
    if index is None:
        try:
            index = torch.cuda.current_device()
        except Exception as exc:  # no driver, no device
            return f"torch sees no CUDA device ({type(exc).__name__}: {exc})"
    if index not in _DEVICE_PROBLEMS:
        record = recorded() or {}
        if "cuda_sass" not in record:
            return None
        try:
            capability = torch.cuda.get_device_capability(index)
        except Exception as exc:
            return f"torch cannot query CUDA device {index} ({type(exc).__name__}: {exc})"
        _DEVICE_PROBLEMS[index] = cuda_arch_problem(
            record["cuda_sass"], record.get("cuda_ptx", ()), capability,
            device=f"{torch.cuda.get_device_name(index)} (cuda:{index})")
    return _DEVICE_PROBLEMS[index]


def build_info() -> dict:
    """What was built and what loads here: the build record of setup.py (``extension``,
    ``backends_compiled``, ``missing`` {backend: why}, ``torch``, ``torch_cuda``, ``cxx``,
    ``cxx_version``, ``cxx_flags``, and for CUDA builds ``cuda_arch_list``, ``cuda_sass``,
    ``cuda_ptx``, ``nvcc``, ``nvcc_version``, ``nvcc_flags``) plus ``recorded``,
    ``torch_running``, ``extension_loaded``, ``extension_error`` and, when loaded,
    ``cuda_kernels_loaded``. ``recorded`` is False (and the record keys absent) for a build
    made before builds were recorded, or never built."""
    record = recorded()
    info = dict(record) if record is not None else {"recorded": False}
    info.setdefault("recorded", record is not None)
    module, error = load_extension()
    info["torch_running"] = torch.__version__
    info["extension_loaded"] = module is not None
    info["extension_error"] = error
    if module is not None:
        info["cuda_kernels_loaded"] = bool(torch.ops.fastnoise.cuda_built())
    return info


def format_build_info(info: Optional[dict] = None) -> str:
    """A few lines for ``python -m fastnoise check``."""
    info = build_info() if info is None else info
    if not info.get("recorded"):
        lines = ["build: no build record (built before builds were recorded, or not built)"]
    else:
        compiled = ", ".join(info.get("backends_compiled") or []) or "nothing"
        lines = [f"build: compiled {compiled}; torch {info.get('torch')}"
                 + (f" (CUDA {info['torch_cuda']})" if info.get("torch_cuda") else "")]
        if info.get("cxx"):
            lines.append(f"  c++:  {info['cxx']} ({info.get('cxx_version')}), flags "
                         f"{' '.join(info.get('cxx_flags', []))}")
        if info.get("nvcc"):
            lines.append(f"  nvcc: {info['nvcc']} ({info.get('nvcc_version')}), flags "
                         f"{' '.join(info.get('nvcc_flags', []))}")
            lines.append(f"  CUDA archs: {info.get('cuda_arch_list')} -> SASS "
                         f"{', '.join(info.get('cuda_sass') or []) or 'none'}; PTX "
                         f"{', '.join(info.get('cuda_ptx') or []) or 'none'}")
        for name, why in (info.get("missing") or {}).items():
            lines.append(f"  {name} kernels not compiled: {why}")
    lines.append("  extension: " + ("loaded" if info.get("extension_loaded")
                                    else f"not loaded: {info.get('extension_error')}"))
    return "\n".join(lines)
