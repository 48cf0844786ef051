"""The Triton kernels compile to sm_80 and sm_90 machine code, with no GPU.

The CPU CI runs the kernels in the interpreter, which never compiles them (and cannot run
bf16): a kernel that only breaks in real compilation, or starts to spill, would land unseen.
tests/triton_compile_worker.py compiles every launch variant (all noise kinds and dtypes, the
flags, the atomic and the two sorted backward kernels, NoisyTune aligned and not, and its
merge) with Triton's bundled ptxas and reads the registers and spills with ``ptxas -v``; here
we check what it reports.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses; .ci/run runs them (-m 'not slow' skips)

triton = pytest.importorskip("triton")

WORKER = Path(__file__).with_name("triton_compile_worker.py")
ARCHS = (80, 90)


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def compiled():
    if not _has_nvidia_backend():
        pytest.skip("this triton has no NVIDIA backend")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = {arch: subprocess.Popen([sys.executable, str(WORKER), str(arch)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}  # both archs at once: ~15 s on 2 cores
    rows = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{arch} compile failed:\n{err[-4000:]}"
        rows[arch] = [json.loads(line) for line in out.splitlines()]
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles(compiled, arch):
    names = [r["variant"] for r in compiled[arch]]
    assert len(names) == len(set(names)) >= 20
    for dtype in ("fp32", "fp16", "bf16"):
        for kind in ("uniform", "gaussian", "bernoulli"):
            assert f"forward {kind} {dtype}" in names
        for step in ("chunk", "combine"):
            assert f"backward {step} {dtype}" in names
            assert f"backward {step} {dtype} pair+scale" in names
    assert "noisytune merge" in names
    assert {"token scale rows mask+positions error", "token scale cu_seqlens mask"} <= set(names)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(compiled, arch):
    rows = [r for r in compiled[arch] if "registers" in r]
    if not rows:
        pytest.skip("no ptxas to read register use")
    for r in rows:
        assert r["spill"] == 0 and r["stack"] == 0, f"{r['variant']} spills: {r}"
        assert r["registers"] <= 255


@pytest.mark.parametrize("arch", ARCHS)
def test_aligned_launches_use_16_byte_vectors(compiled, arch):
    # the gather, the output and NoisyTune's whole blocks are 16-byte loads/stores; losing
    # that (a mask or an index the compiler cannot prove aligned) costs bandwidth
    for r in compiled[arch]:
        name = r["variant"]
        if name.startswith("noisytune") and "unaligned" in name or name == "noisytune merge":
            continue  # (the merge reads a few float64 partials per tensor, once)
        if name.startswith(("forward", "noisytune")):
            assert r["v4_loads"] > 0, r
        if name.startswith(("forward", "noisytune perturb")):
            assert r["v4_stores"] > 0, r


@pytest.mark.parametrize("arch", ARCHS)
def test_noise_needs_no_layout_conversion(compiled, arch):
    # the uniform/Gaussian (and NoisyTune's) words are joined into the 16-byte groups the
    # data moves in: no shared-memory round trip (and its barriers) between noise and data
    for r in compiled[arch]:
        name = r["variant"]
        if (name.startswith("forward") and "bernoulli" not in name
                or name.startswith("noisytune perturb") and "unaligned" not in name):
            assert r["dynamic_shared"] == 0, r


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_kernels_use_no_atomics(compiled, arch):
    # the sorted backward writes each row (or partial) from one program; NoisyTune's
    # statistics only write their partials: the merge is its own launch, so no arrival
    # counter and no single-thread scalar atomic whose ordering the merge would rely on
    rows = [r for r in compiled[arch] if r["variant"].startswith(
        ("backward chunk", "backward combine", "noisytune"))]
    assert len(rows) >= 20
    for r in rows:
        assert r["atomics"] == 0, r
