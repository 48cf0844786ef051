"""The CUDA kernels (csrc/cuda/*_kernels.cuh) executed on the CPU, against the reference.

tests/cuda_emu/harness.cpp includes the kernel headers after tests/cuda_emu/cuda_emu.h, the
host emulator of the CUDA built-ins (threads as fibers that switch at barriers and warp
collectives), and calls the same launch logic as the .cu ops. The test session builds it
once with g++ (cached in a temp dir keyed by a hash of the sources and flags) and loads it
with ctypes. Every kernel runs with its block's threads (and the grid's blocks) in forward,
reverse and seeded random order; a kernel with a barrier removed fails (the mutant tests).

FASTNOISE_EMU_SANITIZE=1 selects the -fsanitize=address,undefined build (needs libasan
preloaded: test_under_sanitizers runs part of this file that way, in a subprocess).
"""

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from fastnoise import reference as R

from op_args import packing_case
from sorted_backward_order import sorted_backward_sums

pytestmark = pytest.mark.cuda_emulated

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emu"
# every file the harness compiles, relative to the repository root
SOURCES = ["tests/cuda_emu/cuda_emu.h", "tests/cuda_emu/harness.cpp",
           "csrc/cuda/device_utils.cuh", "csrc/cuda/embedding_kernels.cuh",
           "csrc/cuda/token_scale_kernels.cuh",
           "csrc/cuda/noisytune_kernels.cuh", "csrc/noise.h", "csrc/philox.h"]
SANITIZE = os.environ.get("FASTNOISE_EMU_SANITIZE", "0") not in ("", "0")
ORDERS = {"forward": 0, "reverse": 1, "random": 2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
WIDTHS = [1, 3, 8, 100, 130, 264, 4200]
NOISE_CODE = {"uniform": 0, "gaussian": 1, "bernoulli": 2}
U64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------
def _compiler():
    return shutil.which(os.environ.get("CXX", "g++"))


def _flags(sanitize, only=None):
    from torch.utils import cpp_extension
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = ["-std=c++20", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-g0",
             "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    if sanitize:
        flags += ["-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=undefined"]
    elif only:
        # one op, float32 only: a build of a few seconds for the mutated copies
        flags += ["-O0", "-DFASTNOISE_EMU_MINIMAL", f"-DFASTNOISE_EMU_ONLY=FASTNOISE_EMU_{only}"]
    else:
        flags += ["-O1"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    flags += [f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}"]
    return flags


def build_harness(root=ROOT, sanitize=False, only=None):
    """Compile tests/cuda_emu/harness.cpp of the tree at `root` (cached); its .so path.
    only: "embedding" or "noisytune", that op's kernels for float32 only."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the CUDA emulator")
    flags = _flags(sanitize, only)
    h = hashlib.sha256()
    for rel in SOURCES:
        h.update(rel.encode() + b"\0" + (Path(root) / rel).read_bytes())
    h.update(" ".join([cxx] + flags + [torch.__version__]).encode())
    out_dir = Path(tempfile.gettempdir()) / "fastnoise_cuda_emu" / h.hexdigest()[:20]
    lib = out_dir / "harness.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"harness.{os.getpid()}.so"
    proc = subprocess.run([cxx, str(Path(root) / "tests/cuda_emu/harness.cpp"), "-o", str(tmp)]
                          + flags, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    os.replace(tmp, lib)  # atomic: a concurrent session sees a whole library or none
    return lib


class Emulator:
    """The harness library: the CUDA ops' kernels and launch logic, on torch CPU tensors."""

    def __init__(self, path, only=None):
        self.lib = ctypes.CDLL(str(path))
        c = ctypes
        ops = {"embedding": ["emu_embedding_forward", "emu_backward_sorted",
                             "emu_backward_atomic", "emu_plan_forward_vec",
                             "emu_plan_backward", "emu_token_scale"],
               "noisytune": ["emu_noisytune"]}
        if only is not None:  # a one-op build: give the other op's entry points no types
            for name in ops["noisytune" if only == "embedding" else "embedding"]:
                setattr(self.lib, name, _Missing())
        p, i64, u64, dbl = c.c_void_p, c.c_int64, c.c_uint64, c.c_double
        self.lib.emu_last_error.restype = c.c_char_p
        self.lib.emu_configure.argtypes = [c.c_int, u64, c.c_int]
        self.lib.emu_embedding_forward.argtypes = [
            c.c_int, p, i64, i64, p, i64, i64, p, i64, i64, c.c_float, p, u64, u64, p, p, u64,
            u64, c.c_int, dbl, p]
        self.lib.emu_token_scale.argtypes = [i64, i64, i64, dbl, p, c.c_int, p, c.c_int, p,
                                             c.c_int, i64, p, p, p]
        self.lib.emu_backward_sorted.argtypes = [i64, p, p, p, i64, i64, i64, i64, c.c_int,
                                                 dbl, p, p]
        self.lib.emu_plan_backward.argtypes = [i64, c.c_int, i64, p]
        self.lib.emu_backward_atomic.argtypes = [i64, c.c_int, p, p, i64, i64, i64, i64,
                                                 c.c_int, dbl, p]
        self.lib.emu_plan_forward_vec.argtypes = [i64] * 5 + [p, p]
        self.lib.emu_noisytune.argtypes = [i64, p, p, p, p, dbl, u64, p, i64, p]
        self.configure("forward")

    def configure(self, order, seed=0, sms=1):
        """Block and thread order; sms: the SM count the launch logic sees (32 blocks each)."""
        self.lib.emu_configure(ORDERS[order], seed, sms)

    def _check(self, rc):
        if rc != 0:
            raise RuntimeError(self.lib.emu_last_error().decode())

    @staticmethod
    def _ptr(t):
        return None if t is None else t.data_ptr()

    def embedding_forward(self, ids, weight, out, *, noise, mag, tok_mag=None, seed=0,
                          offset=0, symmetric=False, embed_scale=1.0, seed_tensor=None,
                          offset_tensor=None, offset_add=0, xor_mask=0, error=None):
        """seed_tensor alone: its seed, counter offset 0; with offset_tensor: the CUDA
        generator's captured Philox state (seed XOR xor_mask, counter (offset + add) / 4)."""
        V, d = weight.shape
        w_stride = weight.stride(0) if V > 1 else d  # as embedding.cu
        assert ids.is_contiguous() and out.is_contiguous()
        self._check(self.lib.emu_embedding_forward(
            int(ids.dtype == torch.int32), ids.data_ptr(), ids.numel(), DTYPE_CODE[weight.dtype],
            weight.data_ptr(), w_stride, V, out.data_ptr(), d, NOISE_CODE[noise], mag,
            self._ptr(tok_mag), seed & U64, offset & U64, self._ptr(seed_tensor),
            self._ptr(offset_tensor), offset_add & U64, xor_mask & U64, int(symmetric),
            embed_scale, self._ptr(error)))
        return out

    def token_scale(self, shape, d, alpha, *, mask=None, positions=None, cu=None, error=None):
        """noisy_embedding.cu's per-token scale of ids of this shape: (mag, scratch)."""
        n = math.prod(shape)
        row = shape[-1] if shape else 1
        mag = torch.full((n,), float("-inf"))  # poisoned
        cu_len = 0 if cu is None else cu.numel()
        scratch = torch.full((max(n, cu_len, 1),), -7, dtype=torch.int32)

        def ref(t):
            if t is None:
                return None, 8
            t = t.contiguous()
            return t, -1 if t.dtype == torch.int8 else t.element_size()
        (mask, mb), (positions, pb), (cu, cb) = ref(mask), ref(positions), ref(cu)
        self._check(self.lib.emu_token_scale(
            n, row, d, alpha, self._ptr(mask), mb, self._ptr(positions), pb, self._ptr(cu), cb,
            cu_len, mag.data_ptr(), scratch.data_ptr(), self._ptr(error)))
        return mag

    def plan_backward(self, dtype, deterministic, n):
        """(sorted path?, rows of its partial buffer): the launch logic's plan_backward."""
        out = (ctypes.c_int64 * 2)()
        self.lib.emu_plan_backward(torch.empty((), dtype=dtype).element_size(),
                                   int(deterministic), n, out)
        return bool(out[0]), out[1]

    def embedding_backward(self, grad_out, ids, num_weights, *, padding_idx=None,
                           symmetric=False, deterministic=True, embed_scale=1.0):
        """As embedding.cu's embedding_backward_cuda: the plan, the sort, the buffers."""
        n, d = ids.numel(), grad_out.shape[1]
        padding = -1 if padding_idx is None else padding_idx % num_weights
        g = grad_out.contiguous()
        grad = torch.zeros(num_weights, d, dtype=g.dtype)
        if n == 0 or d == 0 or num_weights == 0:
            return grad
        sorted_path, partial_rows = self.plan_backward(g.dtype, deterministic, n)
        if sorted_path:
            sorted_ids, perm = torch.sort(ids.long(), stable=True)
            # at::empty in the op: poisoned here, every element read must have been written
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            partial = torch.full((partial_rows, d), float("nan"), dtype=acc)
            self._check(self.lib.emu_backward_sorted(
                DTYPE_CODE[g.dtype], g.data_ptr(), sorted_ids.data_ptr(), perm.data_ptr(), n, d,
                num_weights, padding, int(symmetric), embed_scale, grad.data_ptr(),
                partial.data_ptr()))
            return grad
        self._check(self.lib.emu_backward_atomic(
            DTYPE_CODE[g.dtype], int(ids.dtype == torch.int32), g.data_ptr(), ids.data_ptr(), n,
            d, num_weights, padding, int(symmetric), embed_scale, grad.data_ptr()))
        return grad

    def noisytune_(self, tensors, lam, *, seed, starts, stds=None, stat_budget=0):
        """NoisyTune in place; returns the plan's (stats blocks, perturbation blocks)."""
        k = len(tensors)
        ptrs = (ctypes.c_void_p * k)(*[t.data_ptr() for t in tensors])
        numels = (ctypes.c_int64 * k)(*[t.numel() for t in tensors])
        st = (ctypes.c_int64 * k)(*[s - (1 << 64) if s >= (1 << 63) else s for s in starts])
        dt = (ctypes.c_int64 * k)(*[DTYPE_CODE[t.dtype] for t in tensors])
        sd = None if stds is None else (ctypes.c_double * k)(*stds)
        plan = (ctypes.c_int64 * 2)()
        self._check(self.lib.emu_noisytune(k, ptrs, numels, st, dt, lam, seed & U64, sd,
                                           stat_budget, plan))
        return plan[0], plan[1]


class _Missing:
    """An entry point a one-op build does not have."""
    argtypes = restype = None

    def __call__(self, *args):
        raise AssertionError("this harness build has only the other op's kernels")


_EMULATORS = {}


def emulator_for(root=ROOT, sanitize=SANITIZE, only=None):
    key = (str(root), sanitize, only)
    if key not in _EMULATORS:
        _EMULATORS[key] = Emulator(build_harness(root, sanitize, only), only)
    return _EMULATORS[key]


@pytest.fixture(scope="session")
def emu():
    return emulator_for()


def _orders():
    """forward, reverse and one seeded random order (the seed from the test's torch seed)."""
    return [("forward", 0), ("reverse", 0), ("random", int(torch.randint(0, 2**62, (1,))))]


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
def _rand_u64():
    return int(torch.randint(0, 2**63 - 1, (1,))) * 2 + int(torch.randint(0, 2, (1,)))


def _mag32(x):
    return float(torch.tensor(x, dtype=torch.float32))


def _poisoned(rows, d, dtype):
    return torch.full((rows, d), float("nan"), dtype=dtype)


def _check_forward(emu, *, noise, dtype, V, d, n, symmetric=False, use_tok=False,
                   embed_scale=1.0, weight=None, id_dtype=torch.int64, sms=1):
    seed, offset = _rand_u64(), int(torch.randint(0, 2**40, (1,)))
    weight = torch.randn(V, d).to(dtype) if weight is None else weight
    ids = torch.randint(0, V, (n,), dtype=id_dtype)
    mag = _mag32(float(torch.rand(())) * 0.3 + 0.01)
    tok_mag = torch.rand(n) if use_tok else None
    ref = R.noisy_embedding(ids, weight, noise=noise, mag=mag, tok_mag=tok_mag, seed=seed,
                            offset=offset, symmetric=symmetric, embed_scale=embed_scale)
    for order, order_seed in _orders():
        emu.configure(order, order_seed, sms)
        out = _poisoned((2 if symmetric else 1) * n, d, dtype)
        emu.embedding_forward(ids, weight, out, noise=noise, mag=mag, tok_mag=tok_mag,
                              seed=seed, offset=offset, symmetric=symmetric,
                              embed_scale=embed_scale)
        assert not out.isnan().any(), order
        if noise == "gaussian":
            wide = dtype in (torch.float32, torch.float64)
            torch.testing.assert_close(out, ref, rtol=2e-6 if wide else None,
                                       atol=2e-6 if wide else None, msg=order)
        else:
            assert torch.equal(out, ref), (order, (out.double() - ref.double()).abs().max())


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise", ["uniform", "bernoulli"])
def test_forward_bit_exact(emu, noise, dtype, d):
    n = 4 if d >= 1000 else 37  # more rows than one block's (grid-stride loops, sms=1)
    _check_forward(emu, noise=noise, dtype=dtype, V=11, d=d, n=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [3, 130, 264])
def test_forward_gaussian_close(emu, dtype, d):
    _check_forward(emu, noise="gaussian", dtype=dtype, V=9, d=d, n=13)


@pytest.mark.parametrize("noise", ["uniform", "gaussian", "bernoulli"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_symmetric_token_scale_embed_scale(emu, noise, dtype):
    d = 136
    scale = float(torch.tensor(d ** 0.5).to(dtype))
    _check_forward(emu, noise=noise, dtype=dtype, V=7, d=d, n=21, symmetric=True, use_tok=True,
                   embed_scale=scale, id_dtype=torch.int32)


@pytest.mark.parametrize("noise", ["uniform", "bernoulli"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_many_rows_grid_stride(emu, noise, dtype):
    """More work than the capped grid (32 blocks an SM, sms=1): every block loops."""
    _check_forward(emu, noise=noise, dtype=dtype, V=50, d=8 if noise == "uniform" else 40,
                   n=2100)


def _plan_vec(emu, noise, weight, out):
    """Whether the launch logic takes the 16-byte path (the harness's plan_forward)."""
    return bool(emu.lib.emu_plan_forward_vec(NOISE_CODE[noise], weight.shape[0],
                                             weight.shape[1], weight.stride(0),
                                             weight.element_size(), weight.data_ptr(),
                                             out.data_ptr()))


@pytest.mark.parametrize("noise", ["uniform", "gaussian", "bernoulli"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_unaligned_rows_take_the_scalar_path(emu, noise, dtype):
    """Rows of a weight with an odd row stride (a column slice): the scalar path, same values."""
    V, d, n = 8, 64, 15
    big = torch.randn(V, d + 1).to(dtype)
    weight = big[:, 1:]  # stride d + 1, rows not 16-byte aligned
    probe = torch.empty(1, d, dtype=dtype)
    assert not _plan_vec(emu, noise, weight, probe)
    assert _plan_vec(emu, noise, weight.contiguous(), probe)
    _check_forward(emu, noise=noise, dtype=dtype, V=V, d=d, n=n, weight=weight)


@pytest.mark.parametrize("noise", ["uniform", "bernoulli"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_error", [True, False])
def test_forward_bad_ids_nan_rows_and_error_buffer(emu, noise, symmetric, with_error):
    """C1: a bad id's output rows (both halves of a pair) are NaN, the others exact; the error
    buffer records one bad id, V, then the flag; in-range ids never touch it."""
    V, d, n = 10, 40, 30
    weight = torch.randn(V, d)
    ids = torch.randint(0, V, (n,))
    bad_at = [2, 17, 29]
    ids[bad_at] = torch.tensor([-1, V, 2**40])
    seed = _rand_u64()
    ref = R.noisy_embedding(ids.clamp(0, V - 1), weight, noise=noise, mag=0.1, seed=seed,
                            symmetric=symmetric)
    bad_rows = torch.zeros((2 if symmetric else 1) * n, dtype=torch.bool)
    bad_rows[bad_at] = True
    if symmetric:
        bad_rows[[n + b for b in bad_at]] = True
    for order, order_seed in _orders():
        emu.configure(order, order_seed)
        error = torch.zeros(4, dtype=torch.int64) if with_error else None
        out = torch.zeros((2 if symmetric else 1) * n, d)  # not NaN: the kernel writes them
        emu.embedding_forward(ids, weight, out, noise=noise, mag=0.1, seed=seed,
                              symmetric=symmetric, error=error)
        assert out[bad_rows].isnan().all()
        assert torch.equal(out[~bad_rows], ref[~bad_rows])
        if with_error:
            assert int(error[0]) == 1 and int(error[1]) in (-1, V, 2**40)
            assert int(error[2]) == V and int(error[3]) == 0
    error = torch.zeros(4, dtype=torch.int64)
    emu.embedding_forward(ids.clamp(0, V - 1), weight, torch.empty(n * (1 + symmetric), d),
                          noise=noise, mag=0.1, seed=seed, symmetric=symmetric, error=error)
    assert not error.any()


@pytest.mark.parametrize("noise", ["uniform", "gaussian", "bernoulli"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_seed_from_device_tensor(emu, noise, dtype):
    """seed_ptr: the seed read in-kernel, counter offset 0 (the host seed/offset ignored)."""
    V, d, n = 9, 72, 11
    weight = torch.randn(V, d).to(dtype)
    ids = torch.randint(0, V, (n,))
    value = _rand_u64()
    seed_tensor = torch.tensor([value - (1 << 64) if value >= (1 << 63) else value])
    out = _poisoned(2 * n, d, dtype)
    emu.embedding_forward(ids, weight, out, noise=noise, mag=0.2, seed=123, offset=4567,
                          symmetric=True, seed_tensor=seed_tensor)
    ref = R.noisy_embedding(ids, weight, noise=noise, mag=0.2, seed=value, offset=0,
                            symmetric=True)
    if noise == "gaussian":
        torch.testing.assert_close(out, ref, rtol=2e-6 if dtype == torch.float32 else None,
                                   atol=2e-6 if dtype == torch.float32 else None)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("noise", ["uniform", "bernoulli"])
def test_forward_seed_from_the_captured_generator_state(emu, noise):
    """Under CUDA graph capture the op passes the CUDA generator's Philox state as device
    pointers: the seed (XOR the rank's mask) and the counter offset (offset + intragraph) / 4
    are read when the kernel runs, so every replay draws what the advanced state says."""
    V, d, n = 9, 200, 7
    weight = torch.randn(V, d)
    ids = torch.randint(0, V, (n,))
    seed, mask = _rand_u64(), _rand_u64()
    as64 = lambda v: v - (1 << 64) if v >= (1 << 63) else v  # noqa: E731
    seed_tensor = torch.tensor([as64(seed)])
    offset_tensor = torch.tensor([4 * 1000])
    out = _poisoned(n, d, torch.float32)
    emu.embedding_forward(ids, weight, out, noise=noise, mag=0.3, seed=1, offset=2,
                          seed_tensor=seed_tensor, offset_tensor=offset_tensor, offset_add=4 * 24,
                          xor_mask=mask)
    ref = R.noisy_embedding(ids, weight, noise=noise, mag=0.3, seed=seed ^ mask, offset=1024)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------
# Per-token scale (token_scale_kernels.cuh)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mask", "positions", "mask+positions", "cu", "mask+cu"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 600), (1, 1100), (70, 3)], ids=str)
def test_token_scale_matches_the_reference(emu, kind, shape):
    """Rows longer than a block (600, 1100 > 256 threads: chunks with carries), many rows,
    one token; every order of blocks and threads."""
    batch, length = shape
    mask, positions, cu = packing_case(kind, batch, length)
    d, alpha = 48, 3.5
    ref = R.token_scale(alpha, d, batch * length, length, attention_mask=mask,
                        position_ids=positions, cu_seqlens=cu)
    for order, order_seed in _orders():
        emu.configure(order, order_seed, sms=2)
        error = torch.zeros(4, dtype=torch.int64)
        got = emu.token_scale(shape, d, alpha, mask=mask, positions=positions, cu=cu,
                              error=error)
        assert torch.equal(got, ref), (order, (got - ref).abs().max())
        assert not error.any()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int16,
                                        torch.int32], ids=str)
def test_token_scale_reads_every_integer_dtype(emu, mask_dtype):
    mask, positions, _ = packing_case("mask+positions", 3, 40, mask_dtype)
    positions = positions.to(torch.int32)
    ref = R.token_scale(2.0, 16, 120, 40, attention_mask=mask, position_ids=positions)
    assert torch.equal(emu.token_scale((3, 40), 16, 2.0, mask=mask, positions=positions), ref)


@pytest.mark.parametrize("bad", ["negative position", "cu not from 0", "cu short", "cu down"])
def test_token_scale_invalid_packing_is_nan_and_recorded(emu, bad):
    batch, length = 3, 300
    n = batch * length
    positions = cu = None
    if bad == "negative position":
        positions = torch.arange(length).repeat(batch, 1)
        positions[2, 250] = -1  # one entry, in the last row's second chunk
        code = 3
    else:
        cu = {"cu not from 0": [2, 400, n], "cu short": [0, 400, n - 1],
              "cu down": [0, 500, 400, n]}[bad]
        cu = torch.tensor(cu, dtype=torch.int64)
        code = 2
    for order, order_seed in _orders():
        emu.configure(order, order_seed, sms=2)
        error = torch.zeros(4, dtype=torch.int64)
        got = emu.token_scale((batch, length), 32, 1.0, positions=positions, cu=cu, error=error)
        assert got.isnan().all(), order
        assert error.tolist() == [code, 0, n, 0]


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
def _backward_expected(grad_out, ids, V, *, padding_idx, symmetric, embed_scale):
    """The reference's sums (C3: float64 for float64 grads), in grad_out's dtype."""
    return R.embedding_backward(grad_out, ids, V, padding_idx=padding_idx, symmetric=symmetric,
                                embed_scale=embed_scale).to(grad_out.dtype)


def _assert_backward_close(got, exp, msg=""):
    """Within float32 rounding of the reference's sums (one ulp after rounding to fp16/bf16;
    float64 to 1e-12); rows of ids with at most 32 tokens bit-identical when the sum is in
    token order (the sorted path: such a run is summed serially by one warp)."""
    eps = {torch.float32: 1e-5, torch.float64: 1e-12}.get(got.dtype, None)
    eps = torch.finfo(got.dtype).eps if eps is None else eps
    # atol: float32 rounding of sums of hundreds of rows that may cancel
    atol = (1e-5 * float(exp.abs().max()) + 1e-4) if got.dtype != torch.float64 else 1e-12
    torch.testing.assert_close(got, exp, rtol=eps, atol=atol, msg=msg)


def _short_rows(ids, V):
    counts = torch.bincount(ids.long().clamp(0, V), minlength=V + 1)[:V]
    return counts <= 32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_long_runs(emu, dtype, symmetric, deterministic):
    """Runs of one id (hundreds of rows), padding, embed_scale; both paths (fp16/bf16 take
    the sorted one either way)."""
    V, d, n = 13, 300, 420
    ids = torch.randint(0, V, (n,))
    ids[50:350] = 4  # one long run
    ids = ids[torch.randperm(n)] if deterministic and symmetric else ids
    padding_idx = int(ids[0]) if int(ids[0]) != 4 else None
    scale = float(torch.tensor(d ** 0.5).to(dtype)) if symmetric else 1.0
    grad_out = torch.randn((2 if symmetric else 1) * n, d).to(dtype)
    exp = _backward_expected(grad_out, ids, V, padding_idx=padding_idx, symmetric=symmetric,
                             embed_scale=scale)
    sorted_path, _ = emu.plan_backward(dtype, deterministic, n)
    order_sums = sorted_backward_sums(grad_out, ids, V, padding_idx=padding_idx,
                                      symmetric=symmetric, embed_scale=scale)
    first = None
    for order, order_seed in _orders():
        emu.configure(order, order_seed)
        got = emu.embedding_backward(grad_out, ids, V, padding_idx=padding_idx,
                                     symmetric=symmetric, deterministic=deterministic,
                                     embed_scale=scale)
        assert got.dtype == dtype
        _assert_backward_close(got, exp, msg=order)
        if sorted_path:
            # fixed order: the same bits in every block / thread order, those of the sorted
            # backward's order (short runs: the reference's token-order sums)
            first = got if first is None else first
            assert torch.equal(got, first), order
            assert torch.equal(got, order_sums), order
            short = _short_rows(ids, V)
            assert torch.equal(got[short], exp[short]), order


def _skewed_ids(kind, n, V, gen):
    """Token ids with a heavy hitter: 90 % one token ("skewed"), every token the same
    ("one"), or runs whose lengths straddle the 32-token chunks ("boundary"). Ids V - 5 ..
    V - 1 never occur (rows that must stay zero)."""
    if kind == "one":
        return torch.full((n,), V // 2, dtype=torch.int64)
    if kind == "skewed":
        ids = torch.randint(0, V - 5, (n,), generator=gen)
        ids[torch.rand(n, generator=gen) < 0.9] = 1
        return ids
    # run lengths around one chunk (31..34), two chunks (64, 65) and one token; ids in
    # order, so the runs start at every offset in the chunks
    lengths = [31, 32, 33, 1, 34, 64, 65, 2, 30, 3, 96, 5, 33]
    ids = torch.cat([torch.full((m,), k % V) for k, m in enumerate(lengths)])
    tail = torch.randint(0, V - 5, (max(0, n - ids.numel()),), generator=gen)
    return torch.cat([ids, tail])[:n]


@pytest.mark.parametrize("kind", ["skewed", "one", "boundary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_skewed_ids(emu, kind, dtype):
    """A frequent token (EOS / BOS) over many chunks: split, combined in chunk order, and
    still the reference's sums (to float32 rounding), bit-identical run to run; the other
    ids' rows (<= 32 tokens) bit-identical to it; unused rows and padding_idx zero."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    V, d = 40, 37  # odd width: the scalar path and a ragged tile
    n = {"skewed": 1003, "one": 517, "boundary": 520}[kind]
    ids = _skewed_ids(kind, n, V, gen)
    ids = ids[torch.randperm(n, generator=gen)] if kind != "boundary" else ids
    grad_out = torch.randn(2 * n, d, generator=gen).to(dtype)
    scale = float(torch.tensor(d ** 0.5).to(dtype))
    for padding_idx in (None, 3):
        exp = _backward_expected(grad_out, ids, V, padding_idx=padding_idx, symmetric=True,
                                 embed_scale=scale)
        runs = []
        for order, order_seed in _orders():
            emu.configure(order, order_seed)
            got = emu.embedding_backward(grad_out, ids, V, padding_idx=padding_idx,
                                         symmetric=True, deterministic=True, embed_scale=scale)
            _assert_backward_close(got, exp, msg=order)
            runs.append(got)
        assert all(torch.equal(runs[0], r) for r in runs[1:])
        assert torch.equal(runs[0], sorted_backward_sums(
            grad_out, ids, V, padding_idx=padding_idx, symmetric=True, embed_scale=scale))
        short = _short_rows(ids, V)
        assert torch.equal(runs[0][short], exp[short])
        unused = torch.bincount(ids, minlength=V) == 0
        assert unused.any() and not runs[0][unused].any()
        if padding_idx is not None:
            assert not runs[0][padding_idx].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 4, 8, 130, 264])
def test_backward_widths_vector_and_scalar_paths(emu, dtype, d):
    """d % 4 == 0: 4-column packs, else columns 32 apart: the same bits (each column summed
    in the same order); tiles of 128 columns with a ragged last one."""
    V, n = 9, 300
    ids = torch.randint(0, V, (n,))
    ids[: n // 2] = 5  # a long run of 150 tokens
    grad_out = torch.randn(n, d).to(dtype)
    exp = _backward_expected(grad_out, ids, V, padding_idx=None, symmetric=False,
                             embed_scale=1.0)
    got = emu.embedding_backward(grad_out, ids, V, deterministic=True)
    _assert_backward_close(got, exp)
    assert torch.equal(got, sorted_backward_sums(grad_out, ids, V))
    if d % 4 == 0:  # the scalar path on the same data: a row view with an odd offset
        base = torch.randn(n * d + 1).to(dtype)
        view = base[1:].view(n, d)
        view.copy_(grad_out)
        assert torch.equal(emu.embedding_backward(view, ids, V, deterministic=True), got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_empty_one_token_and_unused_vocabulary(emu, dtype, deterministic):
    """No tokens: a zero gradient; one token; a vocabulary mostly without tokens."""
    V, d = 1000, 12
    empty = emu.embedding_backward(torch.randn(0, d).to(dtype), torch.zeros(0, dtype=torch.long),
                                   V, deterministic=deterministic)
    assert empty.shape == (V, d) and empty.dtype == dtype and not empty.any()
    g = torch.randn(1, d).to(dtype)
    got = emu.embedding_backward(g, torch.tensor([V - 1]), V, deterministic=deterministic)
    assert torch.equal(got[V - 1], g[0]) and not got[: V - 1].any()
    ids = torch.randint(990, V, (77,))
    g = torch.randn(77, d).to(dtype)
    got = emu.embedding_backward(g, ids, V, deterministic=deterministic)
    exp = _backward_expected(g, ids, V, padding_idx=None, symmetric=False, embed_scale=1.0)
    _assert_backward_close(got, exp)
    assert not got[:990].any()


@pytest.mark.parametrize("symmetric", [False, True])
def test_backward_out_of_range_ids_in_long_runs_skipped(emu, symmetric):
    """Bad ids sort to the ends (negative first, >= V last), in runs over several chunks:
    never written, the other rows exact."""
    V, d, n = 10, 20, 400
    ids = torch.randint(0, V, (n,))
    ids[:100] = -1
    ids[100:180] = V
    ids[180:200] = 2**40
    ids = ids[torch.randperm(n)]
    g = torch.randn((2 if symmetric else 1) * n, d)
    keep = (ids >= 0) & (ids < V)
    gk = g.reshape(-1, n, d)[:, keep].reshape(-1, d)
    exp = R.embedding_backward(gk, ids[keep], V, symmetric=symmetric)
    got = emu.embedding_backward(g, ids, V, symmetric=symmetric, deterministic=True)
    _assert_backward_close(got, exp)
    assert torch.equal(got, sorted_backward_sums(g, ids, V, symmetric=symmetric))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_plan_has_no_vocabulary_sized_temporary(emu, dtype, deterministic):
    """fp16/bf16 grads always take the sorted path (no float32 (V, d) buffer and cast): its
    one buffer is ceil(N / 32) rows of partial sums, whatever V; float32/float64 without
    determinism add atomically into the result, with no buffer at all."""
    for n in (1, 31, 32, 33, 16384):
        sorted_path, rows = emu.plan_backward(dtype, deterministic, n)
        assert sorted_path == (deterministic or dtype.itemsize == 2)
        assert rows == ((n + 31) // 32 if sorted_path else 0)


@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_float64_accumulates_in_float64(emu, deterministic):
    """C3: 1 + 2e-9 survives (float32 accumulation would give 1.0)."""
    ids = torch.tensor([2, 2, 2])
    g = torch.tensor([[1.0], [1e-9], [1e-9]], dtype=torch.float64)
    got = emu.embedding_backward(g, ids, 4, deterministic=deterministic)
    assert abs(got[2, 0].item() - 1.000000002) < 1e-15  # float64 sums, in any order


def test_backward_int32_ids_and_out_of_range_ids_skipped(emu):
    V, d, n = 6, 33, 40
    ids = torch.randint(0, V, (n,), dtype=torch.int32)
    grad_out = torch.randn(n, d)
    exp = R.embedding_backward(grad_out, ids, V)
    torch.testing.assert_close(emu.embedding_backward(grad_out, ids, V, deterministic=False),
                               exp, rtol=1e-5, atol=1e-5)
    assert torch.equal(emu.embedding_backward(grad_out, ids, V, deterministic=True), exp)


# ---------------------------------------------------------------------------------------
# NoisyTune
# ---------------------------------------------------------------------------------------
def _noisytune_c2(t, lam, *, seed, start, std64=None):
    """The reference's NoisyTune of one tensor from counter ``start`` (C2; C5: std64 given)."""
    t = t.clone()
    R.noisytune_([t], lam, seed=seed, offset=start, stds=None if std64 is None else [std64])
    return t


def _check_noisytune(emu, tensors, lam, *, stds=None, stat_budget=0, exact_f64=False,
                     orders=None):
    seed, offset = _rand_u64(), int(torch.randint(0, 2**40, (1,)))
    starts = R.noisytune_offsets([t.numel() for t in tensors], offset)
    expected = [_noisytune_c2(t, lam, seed=seed, start=s,
                              std64=None if stds is None else stds[i])
                for i, (t, s) in enumerate(zip(tensors, starts))]
    plans = []
    for order, order_seed in orders or _orders():
        emu.configure(order, order_seed)
        got = [t.clone() for t in tensors]
        plans.append(emu.noisytune_(got, lam, seed=seed, starts=starts, stds=stds,
                                    stat_budget=stat_budget))
        for g, e, t in zip(got, expected, tensors):
            if t.dtype == torch.float64 and stds is None and not exact_f64:
                # std64 from another summation order: s (so the delta) may differ in its last
                # bits, and the sum by its rounding
                eps = torch.finfo(torch.float64).eps
                tol = 8 * eps * (e - t).abs() + 2 * eps * t.abs()
                assert torch.all((g - e).abs() <= tol), (order, ((g - e).abs() - tol).max())
            else:
                assert torch.equal(g.nan_to_num(7.0), e.nan_to_num(7.0)), (order, t.dtype)
    return plans[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noisytune_many_stats_blocks_and_the_merge(emu, dtype):
    """A tensor over > 256 stats blocks (the last block merges more partials than threads),
    next to small ones sharing the budget in proportion."""
    big = (torch.randn(300 * 256 * (8 if dtype.itemsize == 2 else 4) + 5) * 3 + 100).to(dtype)
    tensors = [big, torch.randn(1000).to(dtype), torch.randn(7, 3).to(dtype)]
    # one order per dtype (the big tensor is the slowest case of this file)
    order = {torch.float32: "forward", torch.float16: "reverse"}.get(dtype, "random")
    stat_blocks, pert_blocks = _check_noisytune(emu, tensors, 0.15, stat_budget=400,
                                                orders=[(order, DTYPES.index(dtype))])
    assert stat_blocks >= 301 and pert_blocks >= 302


def test_noisytune_edge_tensors_and_mixed_dtypes(emu):
    """Constant, empty, one-element, inf and NaN tensors stay unchanged; the others (all
    dtypes in one list) are perturbed; a large mean loses nothing (shifted sums)."""
    tensors = [torch.full((50,), 3.25), torch.empty(0), torch.randn(1),
               torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([1.0, float("nan")]),
               torch.randn(33, 5).half(), torch.randn(129).bfloat16(),
               torch.randn(77, dtype=torch.float64) + 1e6, torch.randn(1001) * 0.1 + 5e4,
               torch.full((9,), 1e30, dtype=torch.float64)]
    before = [t.clone() for t in tensors]
    _check_noisytune(emu, tensors, 0.1, stat_budget=64)
    got = [t.clone() for t in tensors]
    starts = R.noisytune_offsets([t.numel() for t in tensors], 0)
    emu.noisytune_(got, 0.1, seed=5, starts=starts)
    for k in (0, 1, 2, 3, 4, 9):
        assert torch.equal(got[k].nan_to_num(7.0), before[k].nan_to_num(7.0)), k
    for k in (5, 6, 7, 8):
        assert not torch.equal(got[k], before[k]), k


def test_noisytune_huge_std_in_float64_statistics(emu):
    """C2: statistics in float64: a std of 1e30 in float32 (squares overflow float32) still
    perturbs, a float32 s that overflows (lam * std > 3.4e38) leaves the tensor unchanged."""
    big = torch.randn(500) * 1e30
    huge = (torch.randn(40) * 3e38).clamp(-3e38, 3e38)  # std ~2e38: 2 * std overflows
    got = [big.clone(), huge.clone()]
    _check_noisytune(emu, got, 2.0)
    emu.noisytune_(got, 2.0, seed=1, starts=[0, 125])
    assert not torch.equal(got[0], big) and torch.equal(got[1], huge)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noisytune_given_stds(emu, dtype):
    """C5: given stds replace the statistics (no stats pass: 0 stats blocks); s = 0 or not
    finite leaves the tensor unchanged."""
    tensors = [torch.randn(300).to(dtype), torch.randn(20, 7).to(dtype),
               torch.randn(10).to(dtype), torch.randn(5).to(dtype)]
    stds = [0.7, 2.5e-3, 0.0, float("inf")]
    stat_blocks, _ = _check_noisytune(emu, tensors, 0.2, stds=stds, exact_f64=True)
    assert stat_blocks == 0


# ---------------------------------------------------------------------------------------
# It can fail: kernels with one barrier (or the backward's second step) removed
# ---------------------------------------------------------------------------------------
def _mutant_root(tmp_path, header, needle, occurrence):
    """A copy of the sources with the `occurrence`-th `needle` of csrc/cuda/`header` removed."""
    for rel in SOURCES:
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, dst)
    path = tmp_path / "csrc" / "cuda" / header
    text = path.read_text()
    spans = [m.start() for m in re.finditer(re.escape(needle), text)]
    assert len(spans) > occurrence, (header, needle, len(spans))
    at = spans[occurrence]
    path.write_text(text[:at] + "/* removed */" + text[at + len(needle):])
    return tmp_path


def _fails(fn):
    try:
        fn()
    except AssertionError:
        return True
    return False


MUTANTS = {
    # lane i writes the chunk's words, then every lane reads any word
    "bernoulli_first_syncwarp": ("embedding_kernels.cuh", "__syncwarp();", 0),
    # the next unit's words overwrite those other lanes still read
    "bernoulli_second_syncwarp": ("embedding_kernels.cuh", "__syncwarp();", 1),
    # thread 0 reads the warps' results before they are written
    "block_merge_syncthreads": ("noisytune_kernels.cuh", "__syncthreads();", 1),
}


def _check_backward_sorted(emu, n=700, d=40):
    """The sorted backward on a heavy hitter (long runs: partials and their combine) and
    short runs across the chunk boundaries, against the reference, in every order."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    ids = torch.cat([_skewed_ids("boundary", n // 2, 40, gen),
                     _skewed_ids("skewed", n - n // 2, 40, gen)])
    grad_out = torch.randn(n, d, generator=gen)
    exp = R.embedding_backward(grad_out, ids, 40)
    for order, order_seed in _orders():
        emu.configure(order, order_seed)
        got = emu.embedding_backward(grad_out, ids, 40, deterministic=True)
        _assert_backward_close(got, exp, msg=order)
        assert torch.equal(got, sorted_backward_sums(grad_out, ids, 40)), order


BACKWARD_MUTANTS = {
    # the second step: runs across chunk boundaries are never finished
    "backward_no_combine_step": ("embedding_kernels.cuh", "if (chunks < 2) ", 0),
    # the combine reads the run's token positions before the other lanes wrote them
    "backward_short_run_syncwarp": ("embedding_kernels.cuh", "__syncwarp();", 3),
    "backward_long_run_syncwarp": ("embedding_kernels.cuh", "__syncwarp();", 4),
}


@pytest.mark.parametrize("mutant", list(MUTANTS) + list(BACKWARD_MUTANTS))
@pytest.mark.slow
def test_kernels_with_a_barrier_removed_fail(emu, tmp_path, mutant):
    header, needle, occurrence = {**MUTANTS, **BACKWARD_MUTANTS}[mutant]
    broken = emulator_for(_mutant_root(tmp_path, header, needle, occurrence), sanitize=False,
                          only=header.split("_")[0])
    if mutant in BACKWARD_MUTANTS:
        check = lambda: _check_backward_sorted(broken)
        good = lambda: _check_backward_sorted(emu)
    elif header == "embedding_kernels.cuh":
        # many units per warp (grid-stride), so the second barrier matters too
        check = lambda: _check_forward(broken, noise="bernoulli", dtype=torch.float32, V=20,
                                       d=300, n=1200)
        good = lambda: _check_forward(emu, noise="bernoulli", dtype=torch.float32, V=20,
                                      d=300, n=1200)
    else:
        tensors = [torch.randn(40000) + 2.0, torch.randn(300)]
        check = lambda: _check_noisytune(broken, tensors, 0.1)
        good = lambda: _check_noisytune(emu, tensors, 0.1)
    good()  # the intact kernels pass the same check
    assert _fails(check), f"{mutant}: the kernels still pass without it"


# ---------------------------------------------------------------------------------------
# AddressSanitizer + UndefinedBehaviorSanitizer
# ---------------------------------------------------------------------------------------
def _libasan():
    cxx = _compiler()
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(SANITIZE, reason="already the sanitizer run")
@pytest.mark.slow
def test_under_sanitizers():
    """Part of this file again, against the -fsanitize=address,undefined build (libasan
    preloaded into a child interpreter)."""
    asan = _libasan()
    if asan is None:
        pytest.skip("no libasan for the C++ compiler")
    build_harness(sanitize=True)  # build errors show here, not in the child
    env = {**os.environ, "FASTNOISE_EMU_SANITIZE": "1", "LD_PRELOAD": asan,
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    # every kernel and path at least once; the widths of the vector and scalar tails; the
    # sorted backward's chunk and combine kernels on long and short runs across chunks
    subset = ("(forward_bit_exact and (4200 or 130)) or (bad_ids and True-True) or unaligned "
              "or (seed_from and float32) or (backward_long_runs and True-) or "
              "(backward_long_runs and False-True) or float64_accumulates or "
              "(skewed_ids and float16) or (widths and 130) or (empty_one_token and True) or "
              "out_of_range_ids_in_long_runs or "
              "(many_stats_blocks and float32) or edge_tensors or given_stds")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(Path(__file__)), "-k", subset],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert " passed" in proc.stdout
