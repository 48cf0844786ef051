"""The compiled extension (fastnoise._C): the "cpu" and "cuda" backends against the reference.

Skipped as a whole when the extension is not built
(``pip install --use-pep517 --no-build-isolation -e .``).
GPU tests carry ``@pytest.mark.gpu``; the nvcc compile check needs only nvcc.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastnoise import reference as R
from fastnoise import extension as ext
from fastnoise.backends import get_backend

import cuda_graphs

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# The nvcc compile check (does not need the extension to be built, nor a GPU)
# ---------------------------------------------------------------------------------------
def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") or (str(Path(cuda_home) / "bin" / "nvcc")
                                    if (Path(cuda_home) / "bin" / "nvcc").exists() else None)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_cuda_sources_compile_with_nvcc():
    """Every csrc/cuda/*.cu compiles for sm_80 and sm_90 against torch's headers."""
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "check_cuda_compiles.sh")],
                          capture_output=True, text=True, env={**os.environ, "NVCC": _nvcc()})
    if proc.returncode == 77:
        pytest.skip("nvcc not found")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


# ---------------------------------------------------------------------------------------
# Everything else needs the built extension
# ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _needs_extension(request):
    """Every test but the nvcc compile check needs the built extension."""
    if not ext.is_built() and request.node.originalname != "test_cuda_sources_compile_with_nvcc":
        pytest.skip(f"fastnoise._C is not built ({ext.load_error()}); {ext.BUILD_HINT}")

HAS_CUDA_KERNELS = ext.is_built() and ext.cuda_built() and torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not HAS_CUDA_KERNELS,
                           reason="needs a GPU and the extension built with CUDA kernels")]),
]
NOISES = ["uniform", "gaussian", "bernoulli"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U64 = (1 << 64) - 1


def _backend(device):
    return ext.CPU_BACKEND if torch.device(device).type == "cpu" else ext.CUDA_BACKEND


def _rand_u64():
    return int(torch.randint(0, 2**63 - 1, (1,)).item()) * 2 + int(torch.randint(0, 2, (1,)))


def _mag32(x):
    return float(torch.tensor(x, dtype=torch.float32))


def _forward(device, ids, weight, *, noise, mag=0.0, tok_mag=None, seed=0, offset=0,
             symmetric=False, **kw):
    n = ids.numel()
    out = torch.full(((2 if symmetric else 1) * n, weight.shape[1]), float("nan"),
                     dtype=weight.dtype, device=device)  # poisoned
    _backend(device).embedding_forward(ids, weight, out, noise=noise, mag=mag, tok_mag=tok_mag,
                                       seed=seed, offset=offset, symmetric=symmetric, **kw)
    return out


def _embed_scale(d, dtype):
    """Gemma's normalizer sqrt(d), rounded to the weight's dtype (as the model does)."""
    return float(torch.tensor(d ** 0.5).to(dtype))


def _check_forward(device, *, noise, dtype, V, d, n, symmetric=False, use_tok=False,
                   seed=None, offset=None, id_dtype=torch.int64, embed_scale=None):
    seed = _rand_u64() if seed is None else seed
    offset = int(torch.randint(0, 2**40, (1,))) if offset is None else offset
    weight = torch.randn(V, d).to(dtype).to(device)
    ids = torch.randint(0, V, (n,), dtype=id_dtype, device=device)
    mag = _mag32(float(torch.rand(())) * 0.3 + 0.01)
    tok_mag = torch.rand(n, device=device) if use_tok else None
    kw = {} if embed_scale is None else dict(embed_scale=embed_scale)
    out = _forward(device, ids, weight, noise=noise, mag=mag, tok_mag=tok_mag, seed=seed,
                   offset=offset, symmetric=symmetric, **kw)
    ref = R.noisy_embedding(ids.cpu(), weight.cpu(), noise=noise, mag=mag,
                            tok_mag=None if tok_mag is None else tok_mag.cpu(), seed=seed,
                            offset=offset, symmetric=symmetric, **kw)
    out = out.cpu()
    assert not out.isnan().any()
    if noise == "gaussian":
        # transcendental functions may differ by an ulp: within the output's rounding (the
        # noise itself is float32, also for float64 weights)
        wide = dtype in (torch.float32, torch.float64)
        torch.testing.assert_close(out, ref, rtol=2e-6 if wide else None,
                                   atol=2e-6 if wide else None)
    else:
        assert torch.equal(out, ref), (out - ref).abs().max()


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("d", [1, 3, 100, 130, 257, 512])
def test_forward_matches_reference(device, noise, dtype, d):
    _check_forward(device, noise=noise, dtype=dtype, V=97, d=d, n=37)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_symmetric_and_token_scale(device, noise, dtype):
    _check_forward(device, noise=noise, dtype=dtype, V=50, d=136, n=23, symmetric=True)
    _check_forward(device, noise=noise, dtype=dtype, V=50, d=136, n=23, use_tok=True)
    _check_forward(device, noise=noise, dtype=dtype, V=50, d=260, n=9, symmetric=True,
                   use_tok=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise", NOISES)
def test_forward_single_token_int32_ids_float64(device, noise):
    _check_forward(device, noise=noise, dtype=torch.float32, V=5, d=64, n=1,
                   id_dtype=torch.int32)
    _check_forward(device, noise=noise, dtype=torch.float64, V=11, d=33, n=7,
                   id_dtype=torch.int32, symmetric=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("offset", [2**32 - 5, 2**64 - 3, U64, 2**63 - 1])
def test_forward_large_offsets_and_seeds(device, noise, offset):
    """Counters that cross 2**32 (carry into the high word) and wrap around 2**64."""
    for seed in (U64, 2**63, 2**32 - 1, 0):
        _check_forward(device, noise=noise, dtype=torch.float32, V=20, d=260, n=6,
                       seed=seed, offset=offset)


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_unscaled_noise(device):
    """out = 0 + xi * 1 exposes the raw gaussian draws: within 1e-6 of the reference."""
    n, d = 64, 516
    seed, offset = _rand_u64(), int(torch.randint(0, 2**62, (1,)))
    weight = torch.zeros(1, d, device=device)
    ids = torch.zeros(n, dtype=torch.long, device=device)
    xi = _forward(device, ids, weight, noise="gaussian", mag=1.0, seed=seed, offset=offset)
    ref = R.draw_noise("gaussian", n, d, seed, offset)
    torch.testing.assert_close(xi.cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_weight_with_row_stride(device):
    """weight may be a column slice (stride(1) == 1, stride(0) > d)."""
    big = torch.randn(40, 300, device=device)
    weight = big[:, 8:8 + 256]
    ids = torch.randint(0, 40, (17,), device=device)
    for noise in NOISES:
        out = _forward(device, ids, weight, noise=noise, mag=0.125, seed=7, offset=3)
        ref = R.noisy_embedding(ids.cpu(), weight.cpu().contiguous(), noise=noise, mag=0.125,
                                seed=7, offset=3)
        torch.testing.assert_close(out.cpu(), ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("noise", NOISES)
def test_forward_embed_scale(device, noise, dtype):
    """Gemma's scaled embedding: e = dtype(e * sqrt(d)) then the noise, bit for bit."""
    for d, symmetric, use_tok in ((136, False, False), (136, True, False), (260, False, True),
                                  (67, True, True)):
        _check_forward(device, noise=noise, dtype=dtype, V=40, d=d, n=13, symmetric=symmetric,
                       use_tok=use_tok, embed_scale=_embed_scale(d, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_embed_scale_no_noise_is_the_scaled_embedding(device, dtype):
    """mag 0: the output is the model's own scaled embedding (HF Gemma: emb * normalizer)."""
    V, d, n = 30, 256, 21
    weight = (torch.randn(V, d) * 3).to(dtype).to(device)
    ids = torch.randint(0, V, (n,), device=device)
    normalizer = torch.tensor(d ** 0.5, dtype=dtype)
    for noise in NOISES:
        out = _forward(device, ids, weight, noise=noise, mag=0.0, seed=3, offset=1,
                       symmetric=True, embed_scale=float(normalizer))
        want = torch.nn.functional.embedding(ids.cpu(), weight.cpu()) * normalizer
        assert torch.equal(out[:n].cpu(), want) and torch.equal(out[n:].cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_embed_scale_one_is_unscaled(device):
    weight = torch.randn(20, 130, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 20, (9,), device=device)
    for noise in NOISES:
        kw = dict(noise=noise, mag=0.1, seed=5, offset=7, symmetric=True)
        assert torch.equal(_forward(device, ids, weight, **kw),
                           _forward(device, ids, weight, embed_scale=1.0, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_zero_tokens(device):
    weight = torch.randn(4, 8, device=device)
    ids = torch.zeros(0, dtype=torch.long, device=device)
    assert _forward(device, ids, weight, noise="uniform", mag=0.1).shape == (0, 8)


def test_forward_out_of_range_ids_raise_on_cpu():
    weight = torch.randn(10, 16)
    for bad in (10, -1, 2**40):
        ids = torch.tensor([1, bad, 2])
        with pytest.raises(IndexError, match=rf"token id {bad} .*out of range \[0, 10\)"):
            _forward("cpu", ids, weight, noise="uniform", mag=0.1)
        with pytest.raises(IndexError, match="out of range"):
            ext.CPU_BACKEND.embedding_backward(torch.randn(3, 16), ids, 10, padding_idx=None,
                                               symmetric=False, deterministic=True)


def _as_i64(seed):
    """The int64 with the bits of the uint64 seed (what torch.tensor can hold)."""
    return seed - 2**64 if seed >= 2**63 else seed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_seed_tensor_equals_seed_offset_0(device, noise, dtype, symmetric):
    V, d, n = 17, 136, 11
    weight = torch.randn(V, d).to(dtype).to(device)
    ids = torch.randint(0, V, (n,), device=device)
    tok_mag = torch.rand(n, device=device)
    seeds = [0, 5, 2**32 + 7, 2**63 - 1, 2**63, 2**64 - 5, U64, _rand_u64()]
    for k, seed in enumerate(seeds):
        kw = dict(noise=noise, mag=_mag32(0.3), tok_mag=tok_mag if k % 2 else None,
                  symmetric=symmetric)
        if k == 2:
            kw["embed_scale"] = _embed_scale(d, dtype)
        want = _forward(device, ids, weight, seed=seed, offset=0, **kw)
        st = torch.tensor([_as_i64(seed)], dtype=torch.int64, device=device)
        got = _forward(device, ids, weight, seed=_rand_u64(), offset=2**40 + 3,
                       seed_tensor=st, **kw)  # seed_tensor overrides seed, offset is 0
        assert not got.isnan().any()
        assert torch.equal(got, want), (seed, (got.double() - want.double()).abs().max())
    # torch.tensor([-5]) is the seed 2**64 - 5 (uint64 bits), offset 0: the reference
    ref = R.noisy_embedding(ids.cpu(), weight.cpu(), noise=noise, mag=_mag32(0.3),
                            seed=2**64 - 5, offset=0, symmetric=symmetric)
    got = _forward(device, ids, weight, noise=noise, mag=_mag32(0.3), seed=1, offset=2,
                   symmetric=symmetric, seed_tensor=torch.tensor([-5], device=device)).cpu()
    if noise == "gaussian":
        wide = dtype in (torch.float32, torch.float64)
        torch.testing.assert_close(got, ref, rtol=2e-6 if wide else None,
                                   atol=2e-6 if wide else None)
    else:
        assert torch.equal(got, ref)


def test_reference_backend_seed_tensor():
    V, d, n = 9, 40, 5
    weight = torch.randn(V, d)
    ids = torch.randint(0, V, (n,))
    be = get_backend("reference")
    for seed in (3, 2**63 + 1, 2**64 - 5):
        a = torch.empty(2 * n, d)
        b = torch.empty(2 * n, d)
        be.embedding_forward(ids, weight, a, noise="uniform", mag=0.1, tok_mag=None,
                             seed=seed, offset=0, symmetric=True)
        be.embedding_forward(ids, weight, b, noise="uniform", mag=0.1, tok_mag=None, seed=9,
                             offset=99, symmetric=True,
                             seed_tensor=torch.tensor([_as_i64(seed)]))
        assert torch.equal(a, b)


def test_forward_seed_tensor_bad_arguments():
    weight = torch.randn(10, 16)
    ids = torch.tensor([1, 2])
    out = torch.empty(2, 16)
    kw = dict(noise="uniform", mag=0.1, tok_mag=None, seed=0, offset=0, symmetric=False)
    with pytest.raises(RuntimeError, match="seed_tensor must be int64"):
        _backend("cpu").embedding_forward(ids, weight, out, seed_tensor=torch.tensor([1.0]),
                                          **kw)
    with pytest.raises(RuntimeError, match="one element"):
        _backend("cpu").embedding_forward(ids, weight, out,
                                          seed_tensor=torch.tensor([1, 2]), **kw)
    # out-of-range ids still raise on the CPU with a seed tensor
    with pytest.raises(IndexError, match="out of range"):
        _backend("cpu").embedding_forward(torch.tensor([1, 10]), weight, out,
                                          seed_tensor=torch.tensor([3]), **kw)


def test_forward_rejects_bad_arguments():
    weight = torch.randn(10, 16)
    ids = torch.tensor([1, 2])
    out = torch.empty(2, 16)
    with pytest.raises(RuntimeError, match="shape"):
        _backend("cpu").embedding_forward(ids, weight, torch.empty(3, 16), noise="uniform",
                                          mag=0.1, tok_mag=None, seed=0, offset=0,
                                          symmetric=False)
    with pytest.raises(RuntimeError, match="dtype"):
        _backend("cpu").embedding_forward(ids, weight, out.half(), noise="uniform", mag=0.1,
                                          tok_mag=None, seed=0, offset=0, symmetric=False)
    with pytest.raises(RuntimeError, match="noise code"):
        torch.ops.fastnoise.embedding_forward(ids, weight, out, 7, 0.1, None, 0, 0, False)
    with pytest.raises(ValueError, match="unknown noise"):
        _backend("cpu").embedding_forward(ids, weight, out, noise="laplace", mag=0.1,
                                          tok_mag=None, seed=0, offset=0, symmetric=False)


def _backward_c3(grad_out, ids, V, *, padding_idx, symmetric, embed_scale=1.0):
    """The reference's weight gradient (contract C3: float64 grads accumulate in float64),
    in grad_out's dtype."""
    return R.embedding_backward(grad_out, ids, V, padding_idx=padding_idx, symmetric=symmetric,
                                embed_scale=embed_scale).to(grad_out.dtype)


def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_ops_reject_bad_arguments():
    """The public ops (torch.compile calls them; so can users) check shapes, strides, dtypes
    and list lengths (csrc/common.h, shared by the CPU and CUDA ops) before any kernel runs."""
    ops = torch.ops.fastnoise
    V, d, n = 10, 16, 4
    w = torch.randn(V, d)
    ids = torch.randint(0, V, (n,))
    out = torch.empty(n, d)
    fwd = ops.embedding_forward
    _raises("one entry per token", fwd, ids, w, out, 0, 0.1, torch.rand(n - 1), 0, 0, False)
    _raises("1-D", fwd, ids.view(2, 2), w, out, 0, 0.1, None, 0, 0, False)
    _raises("contiguous", fwd, torch.randint(0, V, (2 * n,))[::2], w, out, 0, 0.1, None, 0, 0,
            False)
    _raises("rows must be contiguous", fwd, ids, torch.randn(d, V).t(), out, 0, 0.1, None, 0,
            0, False)
    _raises("shape", fwd, ids, w, out, 0, 0.1, None, 0, 0, True)  # symmetric needs 2N rows
    _raises("int32 or int64", fwd, ids.float(), w, out, 0, 0.1, None, 0, 0, False)
    bwd = ops.embedding_backward
    g = torch.randn(n, d)
    _raises(f"{n - 1} rows, expected {n}", bwd, g[:-1], ids, V, None, False, True)
    _raises(f"{n} rows, expected {2 * n}", bwd, g, ids, V, None, True, False)
    _raises("1-D", bwd, g, ids.view(2, 2), V, None, False, True)
    _raises("contiguous", bwd, g, torch.randint(0, V, (2 * n,))[::2], V, None, False, True)
    _raises("int32 or int64", bwd, g, ids.float(), V, None, False, True)
    _raises("2-D", bwd, g.reshape(-1), ids, V, None, False, True)
    _raises("num_weights", bwd, g, ids, -1, None, False, True)
    ts = [torch.randn(5), torch.randn(3)]
    _raises("2 tensors but 1 start", ops.noisytune_, ts, 0.1, 0, [0])
    _raises("2 tensors but 3 start", ops.noisytune_, ts, 0.1, 0, [0, 2, 3])
    _raises("contiguous", ops.noisytune_, [torch.randn(4, 4).t()], 0.1, 0, [0])
    _raises("float32, float16", ops.noisytune_, [torch.arange(5)], 0.1, 0, [0])
    assert torch.equal(ts[0], ts[0].clone())


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_matches_reference(device, dtype, symmetric, deterministic):
    V, d, n = 31, 130, 200  # many repeated ids
    ids = torch.randint(0, V, (n,), device=device)
    padding_idx = int(ids[3])
    grad_out = torch.randn((2 if symmetric else 1) * n, d).to(dtype).to(device)
    got = _backend(device).embedding_backward(grad_out, ids, V, padding_idx=padding_idx,
                                              symmetric=symmetric, deterministic=deterministic)
    assert got.dtype == dtype and got.shape == (V, d)
    ref = _backward_c3(grad_out.cpu(), ids.cpu(), V, padding_idx=padding_idx,
                       symmetric=symmetric)
    assert torch.all(got[padding_idx] == 0)
    if device == "cpu" or deterministic:
        # same fp32 summation order as the reference's index_add_ on CPU (the CUDA sorted
        # kernels: for ids of at most 32 tokens, i.e. every id here; a longer run is summed
        # in 32-token pieces, see tests/test_cuda_emulated.py)
        assert torch.all(torch.bincount(ids.cpu(), minlength=V) <= 32)
        assert torch.equal(got.cpu(), ref)
    else:
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)
    untouched = sorted(set(range(V)) - set(ids.tolist()))
    if untouched:
        assert torch.all(got[untouched] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_embed_scale(device, dtype, symmetric, deterministic):
    """grad = embed_scale * (rows summed per id): each row scaled before it is summed."""
    V, d, n = 23, 130, 150
    scale = _embed_scale(d, dtype)
    ids = torch.randint(0, V, (n,), device=device)
    padding_idx = int(ids[5])
    grad_out = torch.randn((2 if symmetric else 1) * n, d).to(dtype).to(device)
    got = _backend(device).embedding_backward(grad_out, ids, V, padding_idx=padding_idx,
                                              symmetric=symmetric, deterministic=deterministic,
                                              embed_scale=scale)
    assert got.dtype == dtype and got.shape == (V, d)
    ref = _backward_c3(grad_out.cpu(), ids.cpu(), V, padding_idx=padding_idx,
                       symmetric=symmetric, embed_scale=scale)
    if device == "cpu" or deterministic:
        assert torch.equal(got.cpu(), ref)
    else:
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-4)
    unscaled = _backend(device).embedding_backward(grad_out, ids, V, padding_idx=padding_idx,
                                                   symmetric=symmetric, deterministic=True,
                                                   embed_scale=1.0)
    assert torch.equal(unscaled.cpu(), _backward_c3(
        grad_out.cpu(), ids.cpu(), V, padding_idx=padding_idx, symmetric=symmetric))


@pytest.mark.parametrize("V,d", [(37, 130), (1500, 1024)])  # 1500 x 1024: > 2 MiB (huge pages)
def test_cpu_backward_writes_every_row(V, d):
    """The CPU backward allocates its gradient without zeroing it and writes every row: rows
    no token points to (and padding_idx) must come out zero even when the allocator hands
    back memory that held NaN (a freed poisoned buffer of the same size, usually reused)."""
    ids = torch.randint(0, V // 3, (50,))  # most rows untouched
    grad_out = torch.randn(50, d)
    ref = _backward_c3(grad_out, ids, V, padding_idx=int(ids[0]), symmetric=False)
    for _ in range(3):
        poison = torch.full((V, d), float("nan"))
        del poison
        got = ext.CPU_BACKEND.embedding_backward(grad_out, ids, V, padding_idx=int(ids[0]),
                                                 symmetric=False, deterministic=True)
        assert torch.equal(got, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic_run_to_run(device):
    V, d, n = 7, 96, 3000
    ids = torch.randint(0, V, (n,), device=device, dtype=torch.int32)
    grad_out = torch.randn(2 * n, d, device=device)
    runs = [_backend(device).embedding_backward(grad_out, ids, V, padding_idx=None,
                                                symmetric=True, deterministic=True)
            for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_negative_padding_idx_and_empty(device):
    V, d = 6, 5
    ids = torch.tensor([5, 5, 0, 1], device=device)
    g = torch.randn(4, d, device=device)
    got = _backend(device).embedding_backward(g, ids, V, padding_idx=-1, symmetric=False,
                                              deterministic=True)
    assert torch.all(got[5] == 0) and torch.equal(got[0].cpu(), g[2].cpu())
    empty = _backend(device).embedding_backward(
        torch.zeros(0, d, device=device), torch.zeros(0, dtype=torch.long, device=device), V,
        padding_idx=None, symmetric=False, deterministic=True)
    assert empty.shape == (V, d) and not empty.any()


# ---------------------------------------------------------------------------------------
# NoisyTune
# ---------------------------------------------------------------------------------------
def _noisytune_check(device, tensors, lam, seed, offset):
    starts = R.noisytune_offsets([t.numel() for t in tensors], offset)
    before = [t.clone() for t in tensors]
    expected = [t.detach().cpu().clone() for t in tensors]
    R.noisytune_(expected, lam, seed=seed, offset=offset)
    _backend(device).noisytune_(tensors, lam, seed=seed, starts=starts)
    for got, exp, old in zip(tensors, expected, before):
        got = got.cpu()
        if torch.equal(exp, old.cpu()):  # skipped by the reference
            assert torch.equal(got, old.cpu())
            continue
        # std may differ by an ulp: the deltas agree to ~1e-6 relative, the result to the
        # rounding of the final add
        delta_got = got.double() - old.cpu().double()
        delta_exp = exp.double() - old.cpu().double()
        eps = torch.finfo(got.dtype).eps
        tol = eps * old.cpu().double().abs() + 1e-5 * delta_exp.abs() + 1e-30
        assert torch.all((delta_got - delta_exp).abs() <= tol), \
            ((delta_got - delta_exp).abs() - tol).max()
        assert not torch.equal(got, old.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noisytune_matches_reference(device, dtype):
    shapes = [(64, 33), (7,), (1,), (3, 5, 2), (1000,), (129, 257)]
    tensors = [torch.randn(s).to(dtype).to(device) for s in shapes]
    tensors.append(torch.full((50,), 3.0, dtype=dtype, device=device))  # std 0: unchanged
    tensors.append(torch.zeros(0, dtype=dtype, device=device))
    _noisytune_check(device, tensors, 0.15, _rand_u64(), int(torch.randint(0, 2**40, (1,))))


@pytest.mark.parametrize("device", DEVICES)
def test_noisytune_exact_float32(device):
    """float32 result is the reference's bit for bit when the std agrees."""
    t = torch.randn(4099, device=device)
    exp = t.cpu().clone()
    R.noisytune_([exp], 0.1, seed=3, offset=2**64 - 5)
    _backend(device).noisytune_([t], 0.1, seed=3, starts=[2**64 - 5])
    diff = (t.cpu() - exp).abs()
    assert diff.max() <= 2 * torch.finfo(torch.float32).eps * exp.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_noisytune_large_mean_and_mixed_dtypes(device):
    big = (1000.0 + 0.01 * torch.randn(100_000)).to(device)  # naive sum of squares fails here
    half = torch.randn(300).half().to(device)
    one = torch.tensor([5.0], device=device)
    inf = torch.tensor([1.0, float("inf"), 2.0], device=device)
    _noisytune_check(device, [big, one, half, inf], 0.2, _rand_u64(), 12345)
    assert one.item() == 5.0


@pytest.mark.parametrize("device", DEVICES)
def test_noisytune_std_is_stable(device):
    """The scale uses an accurate std even for a large mean: perturbation ~ lam * 0.01."""
    t = (1000.0 + 0.01 * torch.randn(1 << 16, dtype=torch.float64)).float().to(device)
    before = t.clone()
    _backend(device).noisytune_([t], 1.0, seed=1, starts=[0])
    spread = (t - before).double()
    true_std = before.double().std().item()
    # (u - 0.5) * s spans [-s/2, s/2) ~ uniform: its std is s / sqrt(12)
    assert abs(spread.std().item() * 12 ** 0.5 / true_std - 1) < 0.05


# ---------------------------------------------------------------------------------------
# The CPU kernels: their vector code (AVX-512 where the CPU has it, picked at run time) and
# the portable fallback (FASTNOISE_CPU_ISA=portable)
# ---------------------------------------------------------------------------------------
CPU_WIDTHS = [1, 3, 8, 100, 130, 264, 1024, 4200]  # 1024: exactly 8 ±1 counters per row
ALL_DTYPES = DTYPES + [torch.float64]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("d", CPU_WIDTHS)
def test_cpu_forward_odd_widths(noise, dtype, d):
    """Widths around the vector lengths (16 lanes, 64 values per Philox vector, 2048 signs)."""
    n = 5 if d == 4200 else 29
    _check_forward("cpu", noise=noise, dtype=dtype, V=41, d=d, n=n)
    _check_forward("cpu", noise=noise, dtype=dtype, V=41, d=d, n=n, symmetric=True,
                   use_tok=True)
    _check_forward("cpu", noise=noise, dtype=dtype, V=41, d=d, n=n, symmetric=True,
                   embed_scale=_embed_scale(d, dtype))


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's intra-op backend is not OpenMP on Linux")
def test_cpu_kernels_built_with_openmp():
    """at::parallel_for is a header template: compiled without -fopenmp its `omp parallel`
    vanishes and every CPU kernel runs on one thread (results still right, so only the
    build shows it). The extension must call libgomp's parallel region."""
    so = Path(ext._C.__file__).read_bytes()
    assert b"GOMP_parallel" in so


@pytest.mark.parametrize("noise", NOISES)
def test_cpu_forward_independent_of_thread_count(noise):
    weight = torch.randn(300, 264)
    ids = torch.randint(0, 300, (517,))
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(_forward("cpu", ids, weight, noise=noise, mag=0.3, seed=11, offset=7,
                                 symmetric=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("offset", [0, 2**32 - 100, 2**64 - 1000])
def test_cpu_gaussian_draws_many(offset):
    """~270k raw Box-Muller draws (vectorized log, sin, cos) within 1e-6 of the reference,
    counters crossing 2**32 and wrapping 2**64."""
    n, d = 64, 4200
    seed = _rand_u64()
    xi = _forward("cpu", torch.zeros(n, dtype=torch.long), torch.zeros(1, d), noise="gaussian",
                  mag=1.0, seed=seed, offset=offset)
    ref = R.draw_noise("gaussian", n, d, seed, offset)
    torch.testing.assert_close(xi, ref, rtol=1e-6, atol=1e-6)


def test_cpu_backward_float64_accumulates_in_float64():
    """Contract C3: 1 + 2e-9 survives the sum of a float64 gradient."""
    g = torch.tensor([[1.0], [2e-9], [5.0]], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1])
    for symmetric in (False, True):
        grad_out = torch.cat([g, torch.zeros_like(g)]) if symmetric else g
        got = ext.CPU_BACKEND.embedding_backward(grad_out, ids, 2, padding_idx=None,
                                                 symmetric=symmetric, deterministic=True)
        assert got.dtype == torch.float64
        assert got[0, 0].item() == 1.0 + 2e-9 and got[1, 0].item() == 5.0
        scaled = ext.CPU_BACKEND.embedding_backward(grad_out, ids, 2, padding_idx=None,
                                                    symmetric=symmetric, deterministic=True,
                                                    embed_scale=3.0)
        assert scaled[0, 0].item() == 3.0 + 3 * 2e-9


def _noisytune_c2(tensors, lam, seed, starts, stds=None):
    """The reference's NoisyTune (contract C2; C5 with ``stds``), tensor k from ``starts[k]``."""
    for k, (t, start) in enumerate(zip(tensors, starts)):
        R.noisytune_([t], lam, seed=seed, offset=start,
                     stds=None if stds is None else [stds[k]])


def _same(a, b):
    """Equal element for element, NaN equal to NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _check_noisytune_c2(tensors, lam, seed, offset):
    starts = R.noisytune_offsets([t.numel() for t in tensors], offset)
    before = [t.clone() for t in tensors]
    expected = [t.clone() for t in tensors]
    _noisytune_c2(expected, lam, seed, starts)
    ext.CPU_BACKEND.noisytune_(tensors, lam, seed=seed, starts=starts)
    for got, exp, old in zip(tensors, expected, before):
        if _same(exp, old):  # skipped by the rule
            assert _same(got, old)
            continue
        assert not _same(got, old)
        # std64 may differ in its last bits (another summation order): the deltas agree to
        # ~1e-6 relative, the result to the rounding of the final add
        delta_got = got.double() - old.double()
        delta_exp = exp.double() - old.double()
        eps = torch.finfo(got.dtype).eps
        tol = eps * old.double().abs() + 1e-6 * delta_exp.abs() + 1e-300
        assert torch.all((delta_got - delta_exp).abs() <= tol), \
            ((delta_got - delta_exp).abs() - tol).max()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cpu_noisytune_c2(dtype):
    shapes = [(64, 33), (7,), (1,), (3, 5, 2), (1000,), (129, 257), (40000,), (2,)]
    tensors = [(torch.randn(s) * 10 ** float(torch.randint(-3, 4, ()))).to(dtype)
               for s in shapes]
    tensors.append(torch.full((50,), 3.0, dtype=dtype))  # std 0: unchanged
    tensors.append(torch.zeros(0, dtype=dtype))
    tensors.append(torch.tensor([1.0, float("nan"), 2.0], dtype=dtype))  # std NaN: unchanged
    _check_noisytune_c2(tensors, 0.15, _rand_u64(), int(torch.randint(0, 2**40, (1,))))


def test_cpu_noisytune_c2_float64_arithmetic():
    """float64 tensors are perturbed in float64: deltas far below float32's resolution."""
    t = 1.0 + 1e-12 * torch.randn(10_000, dtype=torch.float64)
    old = t.clone()
    _check_noisytune_c2([t], 0.5, 5, 0)
    delta = t - old
    assert delta.abs().max() < 1e-11 and (delta != 0).float().mean() > 0.9


def test_cpu_noisytune_c2_huge_std():
    """std in float64: float32 tensors with std 1e18 and 3e37 are perturbed; a float32 s that
    overflows (std ~4e38) leaves the tensor unchanged; float64 follows its own range."""
    big18 = torch.randn(5000) * 1e18
    big37 = torch.randn(5000) * 1e37
    overflow = torch.tensor([3e38, -3e38, 3e38, -3e38])
    big64 = torch.randn(3000, dtype=torch.float64) * 1e150  # M2 ~ 1e303 still finite
    tensors = [big18, big37, overflow, big64]
    before = [t.clone() for t in tensors]
    _check_noisytune_c2(tensors, 1.0, _rand_u64(), 99)
    assert not torch.equal(big18, before[0]) and not torch.equal(big37, before[1])
    assert torch.equal(overflow, before[2]) and not torch.equal(big64, before[3])
    assert all(torch.isfinite(t).all() for t in (big18, big37, big64))


def test_cpu_noisytune_independent_of_thread_count():
    shapes = [(70000,), (5, 7), (33000,), (128, 128)]
    src = [torch.randn(s) for s in shapes] + [torch.randn(20000, dtype=torch.float64)]
    starts = R.noisytune_offsets([t.numel() for t in src], 123)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            ts = [x.clone() for x in src]
            ext.CPU_BACKEND.noisytune_(ts, 0.2, seed=4, starts=starts)
            results.append(ts)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_cpu_isa_fallbacks_match_reference(isa):
    """The AVX2 and portable kernels (what CPUs without AVX-512 / AVX2 run) pass the same
    checks (a cap the CPU cannot run falls back further: still checked)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "test_cpu_forward_odd_widths and (float32 or float64) or test_cpu_noisytune_c2 "
               "or test_cpu_gaussian_draws_many or test_cpu_forward_independent"],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "FASTNOISE_CPU_ISA": isa})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout


# ---------------------------------------------------------------------------------------
# Op registration: schemas, fake kernels, opcheck
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    opcheck = torch.library.opcheck
    V, d, n = 20, 36, 9
    w = torch.randn(V, d, device=device)
    ids = torch.randint(0, V, (n,), device=device)
    for noise in (0, 1, 2):
        out = torch.empty(2 * n, d, device=device)
        opcheck(torch.ops.fastnoise.embedding_forward.default,
                (ids, w, out, noise, 0.1, torch.rand(n, device=device), 5, -3, True))
        opcheck(torch.ops.fastnoise.embedding_forward.default,
                (ids, w, out[:n], noise, 0.1, None, -1, 2**40, False))
    g = torch.randn(2 * n, d, device=device)
    opcheck(torch.ops.fastnoise.embedding_backward.default, (g, ids, V, 3, True, True))
    opcheck(torch.ops.fastnoise.embedding_backward.default, (g[:n], ids, V, None, False, False))
    # embed_scale (last, default 1.0)
    out = torch.empty(2 * n, d, device=device)
    opcheck(torch.ops.fastnoise.embedding_forward.default,
            (ids, w, out, 0, 0.1, None, 5, 3, True, 6.0))
    opcheck(torch.ops.fastnoise.embedding_backward.default, (g, ids, V, 3, True, True, 6.0))
    opcheck(torch.ops.fastnoise.embedding_backward.default, (g, ids, V, None, True, False, 6.0))
    # seed_tensor (last, default None)
    for noise in (0, 1, 2):
        for st in (torch.tensor([7], device=device), torch.tensor([-5], device=device)):
            out = torch.empty(2 * n, d, device=device)
            opcheck(torch.ops.fastnoise.embedding_forward.default,
                    (ids, w, out, noise, 0.1, None, 5, 3, True, 1.0, st))
            opcheck(torch.ops.fastnoise.embedding_forward.default,
                    (ids, w, out[:n], noise, 0.1, torch.rand(n, device=device), -1, 2**40,
                     False, 6.0, st))
    opcheck(torch.ops.fastnoise.embedding_forward.default,
            (ids, w, out[:n], 0, 0.1, None, 5, 3, False),
            {"seed_tensor": torch.tensor([3], device=device)})
    # error (last, default None; C1: written only by kernels that cannot raise)
    opcheck(torch.ops.fastnoise.embedding_forward.default,
            (ids, w, out[:n], 1, 0.1, None, 5, 3, False, 1.0, None,
             torch.zeros(4, dtype=torch.int64, device=device)))
    ts = [torch.randn(10, 3, device=device), torch.randn(7, device=device)]
    opcheck(torch.ops.fastnoise.noisytune_.default, (ts, 0.1, 9, [0, 8]))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        g = torch.empty(12, 8)
        ids = torch.empty(6, dtype=torch.long)
        grad = torch.ops.fastnoise.embedding_backward(g, ids, 100, None, True, True)
        assert grad.shape == (100, 8)
        out = torch.empty(6, 8)
        torch.ops.fastnoise.embedding_forward(ids, torch.empty(100, 8), out, 0, 0.1, None, 0,
                                              0, False)
        torch.ops.fastnoise.embedding_forward(ids, torch.empty(100, 8), out, 0, 0.1, None, 0,
                                              0, False, 2.5)
        torch.ops.fastnoise.embedding_forward(ids, torch.empty(100, 8), out, 0, 0.1, None, 0,
                                              0, False, 1.0, torch.empty(1, dtype=torch.long))
        grad = torch.ops.fastnoise.embedding_backward(g, ids, 100, None, True, True, 2.5)
        assert grad.shape == (100, 8)


def test_torch_compile_forward():
    weight = torch.randn(30, 16)
    ids = torch.randint(0, 30, (5,))

    def f(ids, weight):
        out = torch.empty(5, 16)
        torch.ops.fastnoise.embedding_forward(ids, weight, out, 2, 0.5, None, 11, 4, False)
        return out * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(ids, weight)
    ref = R.noisy_embedding(ids, weight, noise="bernoulli", mag=0.5, seed=11, offset=4) * 2
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------
# Backend objects
# ---------------------------------------------------------------------------------------
def test_backend_availability():
    assert ext.CPU_BACKEND.name == "cpu" and ext.CUDA_BACKEND.name == "cuda"
    assert ext.CPU_BACKEND.unavailable_reason("cpu") is None
    assert ext.CPU_BACKEND.unavailable_reason("cpu", torch.bfloat16) is None
    assert "int64" in ext.CPU_BACKEND.unavailable_reason("cpu", torch.int64)
    assert ext.CPU_BACKEND.unavailable_reason("cuda") is not None
    assert ext.CUDA_BACKEND.unavailable_reason("cpu") is not None
    reason = ext.CUDA_BACKEND.unavailable_reason("cuda")
    if ext.cuda_built():
        assert reason is None
    else:
        assert "without its CUDA kernels" in reason and "pip install" in reason


def test_registry_sees_extension_backends():
    from fastnoise import backends
    assert "cpu" in backends.available_backends("cpu")
    assert backends.resolve_backend("cpu", "cpu").name == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "embed_scale"])
def test_cuda_matches_cpu_extension_large(noise, dtype, scaled):
    """A realistic size (vectorized paths, many blocks): CUDA == CPU extension."""
    V, d, n = 1000, 4096, 2048
    weight = torch.randn(V, d).to(dtype)
    ids = torch.randint(0, V, (n,))
    kw = dict(noise=noise, mag=_mag32(0.05), seed=_rand_u64(), offset=2**32 - 100,
              symmetric=True)
    if scaled:
        kw["embed_scale"] = _embed_scale(d, dtype)
    cpu = _forward("cpu", ids, weight, **kw)
    gpu = _forward("cuda", ids.cuda(), weight.cuda(), **kw).cpu()
    if noise == "gaussian":
        torch.testing.assert_close(gpu, cpu, rtol=2e-6 if dtype == torch.float32 else None,
                                   atol=2e-6 if dtype == torch.float32 else None)
    else:
        assert torch.equal(gpu, cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
def test_cuda_out_of_range_ids_do_not_crash():
    weight = torch.randn(10, 64, device="cuda")
    ids = torch.tensor([1, 10, -3, 2], device="cuda")
    out = _forward("cuda", ids, weight, noise="uniform", mag=0.1)
    torch.cuda.synchronize()
    assert out[1].isnan().all() and out[2].isnan().all() and not out[0].isnan().any()
    grad = ext.CUDA_BACKEND.embedding_backward(torch.ones(4, 64, device="cuda"), ids, 10,
                                               padding_idx=None, symmetric=False,
                                               deterministic=True)
    assert grad.sum().item() == 128.0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_cuda_graph_replays_draw_new_noise(noise, dtype):
    """A graph captured around torch.randint + the forward: each replay reads the seed the
    replay drew (in-kernel), so the noise changes and matches the reference for that seed."""
    V, d, n = 500, 264, 70  # d = 264: the unvectorized paths too for bf16
    weight = torch.randn(V, d, device="cuda").to(dtype)
    ids = torch.randint(0, V, (n,), device="cuda")
    out = torch.empty(2 * n, d, device="cuda", dtype=dtype)
    kw = dict(noise=noise, mag=_mag32(0.1), tok_mag=None, seed=0, offset=0, symmetric=True)

    def step():
        st = torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cuda")
        ext.CUDA_BACKEND.embedding_forward(ids, weight, out, seed_tensor=st, **kw)
        return st

    graph, st = cuda_graphs.capture(step)
    seeds, outs = zip(*cuda_graphs.replay(graph, lambda: (int(st.item()), out.clone())))
    assert seeds[0] != seeds[1] and not torch.equal(outs[0], outs[1])
    for o, s in zip(outs, seeds):
        ref = R.noisy_embedding(ids.cpu(), weight.cpu(), noise=noise, mag=_mag32(0.1),
                                seed=s, offset=0, symmetric=True)
        if noise == "gaussian":
            wide = dtype == torch.float32
            torch.testing.assert_close(o.cpu(), ref, rtol=2e-6 if wide else None,
                                       atol=2e-6 if wide else None)
        else:
            assert torch.equal(o.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
def test_cuda_seed_tensor_on_wrong_device_raises():
    weight = torch.randn(10, 16, device="cuda")
    ids = torch.tensor([1, 2], device="cuda")
    with pytest.raises(RuntimeError, match="seed_tensor is on"):
        _forward("cuda", ids, weight, noise="uniform", mag=0.1, seed_tensor=torch.tensor([1]))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("noise", NOISES)
def test_cuda_error_buffer_records_a_bad_id(noise):
    """C1: NaN rows, then error = [1, one bad id, V, 0]; in-range ids leave it untouched."""
    V = 10
    weight = torch.randn(V, 64, device="cuda")
    ids = torch.tensor([1, 10, -3, 2], device="cuda")
    error = torch.zeros(4, dtype=torch.int64, device="cuda")
    out = _forward("cuda", ids, weight, noise=noise, mag=0.1, symmetric=True, error=error)
    assert out[[1, 2, 5, 6]].isnan().all() and not out[[0, 3, 4, 7]].isnan().any()
    e = error.tolist()
    assert e[0] == 1 and e[1] in (10, -3) and e[2] == V and e[3] == 0
    error.zero_()
    _forward("cuda", ids.clamp(0, V - 1), weight, noise=noise, mag=0.1, error=error)
    assert not error.any()
    for bad in (torch.zeros(4, dtype=torch.int32, device="cuda"),
                torch.zeros(3, dtype=torch.int64, device="cuda"),
                torch.zeros(8, dtype=torch.int64, device="cuda")[::2],
                torch.zeros(4, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="error"):
            _forward("cuda", ids, weight, noise=noise, mag=0.1, error=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_noisytune_given_stds_and_float64(dtype):
    """C5: given stds replace the statistics; C2: float64 tensors perturbed in float64."""
    tensors = [torch.randn(1000, device="cuda").to(dtype), torch.randn(37, device="cuda").to(dtype)]
    stds, lam, seed = [0.5, 0.0], 0.2, 99
    starts = R.noisytune_offsets([t.numel() for t in tensors], 0)
    before = [t.clone() for t in tensors]
    ext.CUDA_BACKEND.noisytune_(tensors, lam, seed=seed, starts=starts, stds=stds)
    assert torch.equal(tensors[1], before[1])  # s = 0: unchanged
    x = before[0].cpu()
    u = R.uniform01(R.noise_words(seed, starts[0], 250)).reshape(-1)
    if dtype == torch.float64:
        exp = x + (u.double() - 0.5) * (lam * 0.5)
    else:
        s = torch.tensor(lam, dtype=torch.float32) * torch.tensor(0.5, dtype=torch.float32)
        exp = (x.float() + (u - 0.5) * s).to(dtype)
    assert torch.equal(tensors[0].cpu(), exp)
