"""Triton backend vs the reference. On a CPU-only machine the kernels run in the Triton
interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small and dtypes fp32/fp16
(the interpreter cannot round to bfloat16: the backend refuses bf16 there)."""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest does this too; must precede triton

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastnoise import reference as R  # noqa: E402
from fastnoise.backends import (BackendUnavailableError, available_backends,  # noqa: E402
                                get_backend, resolve_backend)
from fastnoise.triton_ops import BACKEND  # noqa: E402
from fastnoise.triton_ops import embedding as E  # noqa: E402
from fastnoise.triton_ops import noisytune as NT  # noqa: E402

import cuda_graphs  # noqa: E402
from sorted_backward_order import sorted_backward_sums  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NOISES = ("uniform", "gaussian", "bernoulli")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(),
                                      reason="the Triton interpreter (CPU-only machines)")


def _forward(ids, weight, *, noise, mag=0.0, tok_mag=None, seed=0, offset=0, symmetric=False,
             **kw):
    n, d = ids.numel(), weight.shape[1]
    out = torch.full((2 * n if symmetric else n, d), float("nan"), dtype=weight.dtype,
                     device=weight.device)  # poisoned: every element must be written
    BACKEND.embedding_forward(ids.reshape(-1).contiguous(), weight, out, noise=noise, mag=mag,
                              tok_mag=tok_mag, seed=seed, offset=offset, symmetric=symmetric,
                              **kw)
    return out


def _embed_scale(d, dtype):
    """Gemma's normalizer sqrt(d), rounded to the weight's dtype (as the model does)."""
    return float(torch.tensor(d ** 0.5).to(dtype))


def _check(out, ref, noise, mag):
    assert not torch.isnan(out).any()
    if noise == "gaussian" and out.dtype == torch.float16:
        # the fp32 sums agree to ~1e-6; after rounding to fp16 allow one fp16 ulp
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-10, atol=1e-6)
    elif noise == "gaussian":
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * max(mag, 1.0))
    else:
        assert torch.equal(out, ref), (out - ref).abs().max()


# --------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------
def test_backend_is_registered_and_available():
    assert BACKEND.name == "triton"
    assert get_backend("triton").unavailable_reason(DEVICE, torch.float32) is None
    for dtype in (torch.float16, None):
        assert BACKEND.unavailable_reason(DEVICE, dtype) is None
    if DEVICE.type == "cuda":
        assert BACKEND.unavailable_reason(DEVICE, torch.bfloat16) is None


@interpreter_only
def test_interpreter_offers_no_bfloat16():
    # the interpreter truncates float32 -> bf16: about half the elements 1 ulp off the contract
    reason = BACKEND.unavailable_reason(torch.device("cpu"), torch.bfloat16)
    assert "truncation" in reason and "bfloat16" in reason
    assert "triton" not in available_backends("cpu", torch.bfloat16)
    assert "triton" in available_backends("cpu", torch.float16)
    with pytest.raises(BackendUnavailableError, match="truncation"):
        resolve_backend("triton", "cpu", torch.bfloat16)


@interpreter_only
def test_interpreter_noisytune_refuses_bfloat16_before_touching_anything():
    fp32, bf16 = torch.randn(100), torch.randn(100).bfloat16()
    before = fp32.clone()
    with pytest.raises(BackendUnavailableError, match="truncation"):
        BACKEND.noisytune_([fp32, bf16], 0.1, seed=1, starts=[0, 25])
    assert torch.equal(fp32, before)


def test_unavailable_reasons(monkeypatch):
    assert "float64" in BACKEND.unavailable_reason(DEVICE, torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in BACKEND.unavailable_reason(torch.device("cpu"))
    assert BACKEND.unavailable_reason(torch.device("meta")) is not None


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("d", [1, 5, 100, 130, 300])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_forward_matches_reference(noise, d, symmetric, per_token):
    vocab, n = 37, 11  # neither a multiple of any block
    weight = torch.randn(vocab, d, device=DEVICE)
    id_dtype = torch.int32 if d % 2 else torch.int64
    ids = torch.randint(0, vocab, (n,), device=DEVICE, dtype=id_dtype)
    tok = torch.rand(n, device=DEVICE) if per_token else None
    kw = dict(noise=noise, mag=0.125, tok_mag=tok, seed=1234567, offset=99, symmetric=symmetric)
    _check(_forward(ids, weight, **kw), R.noisy_embedding(ids, weight, **kw), noise, 1.0)


@pytest.mark.parametrize("noise", NOISES)
def test_noise_words_in_column_order(noise):
    # zero weight, mag 1: the output is the noise xi itself, element by element
    n, d = 6, 260  # 260 = 2 * 128 + 4: two full bernoulli words-groups and a ragged tail
    out = _forward(torch.zeros(n, dtype=torch.long, device=DEVICE),
                   torch.zeros(1, d, device=DEVICE), noise=noise, mag=1.0, seed=5, offset=7)
    xi = R.draw_noise(noise, n, d, 5, 7, device=DEVICE)
    if noise == "gaussian":
        torch.testing.assert_close(out, xi, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, xi)


@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 1), (2, 5), (2, 3, 4)])
@pytest.mark.parametrize("noise", NOISES)
def test_forward_id_shapes(shape, noise):
    vocab, d = 13, 48
    weight = torch.randn(vocab, d, device=DEVICE)
    ids = torch.randint(0, vocab, shape, device=DEVICE)
    kw = dict(noise=noise, mag=0.3, seed=42, offset=3)
    _check(_forward(ids, weight, **kw), R.noisy_embedding(ids.reshape(-1), weight, **kw), noise, 1.)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("seed,offset", [
    (2**64 - 1, 2**64 - 3),        # counters wrap past 2**64 inside the call
    (2**64 - 12345, 2**32 - 5),    # counters cross 2**32 (the hi word carries)
    (2**63 + 17, 2**63 - 2),
    (0, 0),
])
def test_forward_large_seed_and_offset(noise, seed, offset):
    vocab, n, d = 9, 7, 136
    weight = torch.randn(vocab, d, device=DEVICE)
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    kw = dict(noise=noise, mag=0.5, seed=seed, offset=offset, symmetric=True)
    _check(_forward(ids, weight, **kw), R.noisy_embedding(ids, weight, **kw), noise, 1.0)


def test_forward_vocab_one_and_single_token():
    weight = torch.randn(1, 7, device=DEVICE)
    ids = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kw = dict(noise="uniform", mag=0.01, seed=1, offset=0)
    _check(_forward(ids, weight, **kw), R.noisy_embedding(ids, weight, **kw), "uniform", 1.0)


def test_forward_masked_tokens_get_no_noise():
    weight = torch.randn(10, 20, device=DEVICE)
    ids = torch.randint(0, 10, (2, 5), device=DEVICE)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], device=DEVICE)
    # per-token mag as the frontend builds it: alpha / sqrt(L * d) on kept tokens, 0 elsewhere
    tok = torch.where(mask.reshape(-1) != 0, 5.0 / (3 * 20) ** 0.5, 0.0).float()
    out = _forward(ids, weight, noise="gaussian", tok_mag=tok, seed=3, symmetric=True)
    e = weight[ids.reshape(-1)]
    keep = mask.reshape(-1) != 0
    assert torch.equal(out[:10][~keep], e[~keep]) and torch.equal(out[10:][~keep], e[~keep])
    assert not torch.equal(out[:10][keep], e[keep])
    ref = R.noisy_embedding(ids.reshape(-1), weight, noise="gaussian", tok_mag=tok, seed=3,
                            symmetric=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_forward_weight_row_stride():
    # a (V, d) view with row stride > d (stride(1) == 1)
    base = torch.randn(12, 40, device=DEVICE)
    weight = base[:, 3:33]
    ids = torch.randint(0, 12, (9,), device=DEVICE)
    kw = dict(noise="bernoulli", mag=0.2, seed=11, offset=5)
    _check(_forward(ids, weight, **kw), R.noisy_embedding(ids, weight, **kw), "bernoulli", 1.0)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_float16(noise, symmetric):
    vocab, n, d = 21, 9, 70
    weight = torch.randn(vocab, d, device=DEVICE).half()
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    kw = dict(noise=noise, mag=0.25, seed=77, offset=1000, symmetric=symmetric)
    out, ref = _forward(ids, weight, **kw), R.noisy_embedding(ids, weight, **kw)
    assert out.dtype == torch.float16 and not torch.isnan(out).any()
    if noise == "gaussian":
        # the fp32 sums agree to ~1e-6; after rounding to fp16 allow one fp16 ulp
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-10, atol=1e-6)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_forward_embed_scale(noise, dtype, symmetric, per_token):
    """Gemma's scaled embedding: e = dtype(e * sqrt(d)), then the noise (bit for bit)."""
    vocab, n, d = 23, 7, 130
    weight = torch.randn(vocab, d, device=DEVICE).to(dtype)
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    tok = torch.rand(n, device=DEVICE) if per_token else None
    kw = dict(noise=noise, mag=0.25, tok_mag=tok, seed=2**64 - 5, offset=31,
              symmetric=symmetric, embed_scale=_embed_scale(d, dtype))
    out, ref = _forward(ids, weight, **kw), R.noisy_embedding(ids, weight, **kw)
    assert out.dtype == dtype and not torch.isnan(out).any()
    if noise == "gaussian":
        tol = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-10,
                                                                              atol=1e-5)
        torch.testing.assert_close(out.float(), ref.float(), **tol)
    else:
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_embed_scale_no_noise_and_one(dtype):
    """mag 0 gives the model's own scaled embedding; embed_scale 1.0 is the unscaled op."""
    vocab, n, d = 15, 6, 256
    weight = (torch.randn(vocab, d, device=DEVICE) * 3).to(dtype)
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    normalizer = torch.tensor(d ** 0.5, dtype=dtype, device=DEVICE)
    out = _forward(ids, weight, noise="uniform", mag=0.0, embed_scale=float(normalizer))
    assert torch.equal(out, torch.nn.functional.embedding(ids, weight) * normalizer)
    kw = dict(noise="bernoulli", mag=0.1, seed=3, offset=4, symmetric=True)
    assert torch.equal(_forward(ids, weight, **kw), _forward(ids, weight, embed_scale=1.0, **kw))


def test_forward_is_reproducible_and_offset_sensitive():
    """The same call twice gives the reference's bits both times; the counter offset moves
    the draw to the reference's draw at that offset (the next call's counters)."""
    weight = torch.randn(16, 64, device=DEVICE)
    ids = torch.randint(0, 16, (10,), device=DEVICE)
    kw = dict(noise="uniform", mag=1.0, seed=9)
    later = R.counters_used("uniform", 10, 64)
    a = _forward(ids, weight, offset=0, **kw)
    b = _forward(ids, weight, offset=0, **kw)
    c = _forward(ids, weight, offset=later, **kw)
    assert torch.equal(a, R.noisy_embedding(ids, weight, offset=0, **kw))
    assert torch.equal(b, a)
    assert torch.equal(c, R.noisy_embedding(ids, weight, offset=later, **kw))
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------
# seed from a device tensor (CUDA-graph-safe seeds)
# --------------------------------------------------------------------------------------
def _as_i64(seed):
    """The int64 with the bits of the uint64 seed (what torch.tensor can hold)."""
    return seed - 2**64 if seed >= 2**63 else seed


SEEDS_U64 = [0, 5, 2**32 - 1, 2**32 + 7, 2**63 - 1, 2**63, 2**64 - 5, 2**64 - 1]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_seed_tensor_equals_seed_offset_0(backend, noise, dtype, symmetric):
    be = get_backend(backend)
    vocab, n, d = 13, 6, 136
    weight = torch.randn(vocab, d, device=DEVICE).to(dtype)
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    tok_mag = torch.rand(n, device=DEVICE)
    for k, seed in enumerate(SEEDS_U64):
        kw = dict(noise=noise, mag=0.3, tok_mag=tok_mag if k % 2 else None,
                  symmetric=symmetric)
        if k == 3:
            kw["embed_scale"] = _embed_scale(d, dtype)
        rows = 2 * n if symmetric else n
        want = torch.full((rows, d), float("nan"), dtype=dtype, device=DEVICE)
        be.embedding_forward(ids, weight, want, seed=seed, offset=0, **kw)
        got = torch.full_like(want, float("nan"))
        st = torch.tensor([_as_i64(seed)], dtype=torch.int64, device=DEVICE)
        # seed_tensor overrides seed and offset (offset 0)
        be.embedding_forward(ids, weight, got, seed=12345, offset=2**40 + 3, seed_tensor=st,
                             **kw)
        assert not got.isnan().any()
        assert torch.equal(got, want), (seed, (got.float() - want.float()).abs().max())
    # and the reference's definition, via the seed
    ref = R.noisy_embedding(ids, weight, noise=noise, mag=0.3, seed=2**64 - 1, offset=0,
                            symmetric=symmetric)
    got = _forward(ids, weight, noise=noise, mag=0.3, seed=7, offset=9, symmetric=symmetric,
                   seed_tensor=torch.tensor([-1], device=DEVICE))
    _check(got, ref, noise, 1.0)


def test_forward_seed_tensor_bad_arguments():
    weight = torch.randn(4, 8, device=DEVICE)
    ids = torch.tensor([0, 1], device=DEVICE)
    for bad in (torch.tensor([1], dtype=torch.int32, device=DEVICE),
                torch.tensor([1.0], device=DEVICE), torch.zeros(0, dtype=torch.int64)):
        with pytest.raises(ValueError, match="seed_tensor"):
            _forward(ids, weight, noise="uniform", mag=0.1, seed_tensor=bad)


# --------------------------------------------------------------------------------------
# out-of-range ids (the frontend cannot check them inside a captured graph)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_forward_out_of_range_ids_give_nan_rows(noise, dtype, symmetric, scaled):
    vocab, n, d = 10, 9, 136
    weight = torch.randn(vocab, d, device=DEVICE).to(dtype)
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    bad = torch.tensor([1, 4, 5, 8], device=DEVICE)
    ids[bad] = torch.tensor([vocab, -1, 2**40, -(2**40)], device=DEVICE)
    kw = dict(noise=noise, mag=0.2, seed=2**63 + 11, offset=17, symmetric=symmetric)
    if scaled:
        kw["embed_scale"] = _embed_scale(d, dtype)
    out = torch.zeros(2 * n if symmetric else n, d, dtype=dtype, device=DEVICE)
    BACKEND.embedding_forward(ids, weight, out, tok_mag=None, **kw)  # bypasses the frontend
    is_bad = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    is_bad[bad] = True
    row_bad = torch.cat([is_bad, is_bad]) if symmetric else is_bad
    assert out[row_bad].isnan().all()
    good = out[~row_bad]
    # the other rows: exactly the reference (noise counters depend on the row, not the id)
    ref = R.noisy_embedding(torch.where(is_bad, 0, ids), weight, tok_mag=None, **kw)
    _check(good, ref[~row_bad], noise, 1.0)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_forward_records_a_bad_id_in_the_error_buffer(noise, dtype, symmetric, id_dtype):
    """C1: NaN rows for bad ids, and error = [1, one of the bad ids, V, untouched]."""
    vocab, n, d = 10, 70, 300  # two row tiles, three column blocks
    weight = torch.randn(vocab, d, device=DEVICE).to(dtype)
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    bad_rows = torch.tensor([2, 40, 69], device=DEVICE)
    bad_ids = [-3, vocab, 2**31 - 1] if id_dtype == torch.int32 else [-(2**40), vocab, 2**40]
    ids[bad_rows] = torch.tensor(bad_ids, device=DEVICE)
    ids = ids.to(id_dtype)
    error = torch.tensor([0, 0, 0, -77], dtype=torch.int64, device=DEVICE)
    kw = dict(noise=noise, mag=0.3, seed=2**64 - 9, offset=5, symmetric=symmetric)
    out = _forward(ids, weight, error=error, **kw)
    is_bad = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    is_bad[bad_rows] = True
    row_bad = torch.cat([is_bad, is_bad]) if symmetric else is_bad
    assert out[row_bad].isnan().all()
    ref = R.noisy_embedding(torch.where(is_bad, 0, ids.long()), weight, tok_mag=None, **kw)
    _check(out[~row_bad], ref[~row_bad], noise, 1.0)
    assert error[0].item() == 1 and error[2].item() == vocab and error[3].item() == -77
    assert error[1].item() in bad_ids


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_forward_good_ids_leave_the_error_buffer_untouched(noise, symmetric, id_dtype):
    vocab, n, d = 37, 70, 300  # ids 0 and V - 1 included; several row tiles and column blocks
    weight = torch.randn(vocab, d, device=DEVICE)
    ids = torch.randint(0, vocab, (n,), device=DEVICE, dtype=id_dtype)
    ids[0], ids[-1] = 0, vocab - 1
    sentinel = torch.tensor([5, -6, 7, -8], dtype=torch.int64, device=DEVICE)
    error = sentinel.clone()
    kw = dict(noise=noise, mag=0.3, seed=123, offset=2**40, symmetric=symmetric,
              embed_scale=1.5)
    out = _forward(ids, weight, error=error, **kw)
    assert torch.equal(error, sentinel)
    _check(out, R.noisy_embedding(ids, weight, tok_mag=None, **kw), noise, 1.0)
    # the buffer changes nothing else: bit for bit the launch without it
    assert torch.equal(out, _forward(ids, weight, **kw))


def test_forward_error_buffer_with_tokens_masked_and_seed_tensor():
    vocab, n, d = 9, 6, 20
    weight = torch.randn(vocab, d, device=DEVICE)
    ids = torch.tensor([3, 9, 0, 8, -1, 4], device=DEVICE)
    tok_mag = torch.rand(n, device=DEVICE)
    error = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    st = torch.tensor([_as_i64(2**63 + 3)], dtype=torch.int64, device=DEVICE)
    out = _forward(ids, weight, noise="gaussian", tok_mag=tok_mag, seed_tensor=st, error=error,
                   symmetric=True)
    assert out[[1, 4, 7, 10]].isnan().all() and not out[[0, 2, 3, 5, 6, 8, 9, 11]].isnan().any()
    assert error[0].item() == 1 and error[1].item() in (9, -1) and error[2].item() == vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_skips_out_of_range_ids(dtype, symmetric, deterministic):
    vocab, n, d = 10, 12, 130
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    bad = torch.tensor([0, 3, 7, 11], device=DEVICE)
    ids[bad] = torch.tensor([-1, vocab, 2**40, -(2**40)], device=DEVICE)
    grad = torch.randn(2 * n if symmetric else n, d, device=DEVICE).to(dtype)
    out = BACKEND.embedding_backward(grad, ids, vocab, padding_idx=None, symmetric=symmetric,
                                     deterministic=deterministic)
    keep = torch.ones(n, dtype=torch.bool, device=DEVICE)
    keep[bad] = False
    g = grad.reshape(2, n, d)[:, keep].reshape(-1, d) if symmetric else grad[keep]
    ref = R.embedding_backward(g, ids[keep], vocab, padding_idx=None, symmetric=symmetric)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_backward_matches_reference(dtype, symmetric, deterministic, padding_idx):
    vocab, n, d = 19, 40, 130  # few distinct ids: long runs of repeats
    ids = torch.randint(0, vocab, (n,), device=DEVICE, dtype=torch.int32)
    ids[:5] = 3
    grad = torch.randn(2 * n if symmetric else n, d, device=DEVICE).to(dtype)
    out = BACKEND.embedding_backward(grad, ids, vocab, padding_idx=padding_idx,
                                     symmetric=symmetric, deterministic=deterministic)
    ref = R.embedding_backward(grad, ids, vocab, padding_idx=padding_idx, symmetric=symmetric)
    assert out.shape == (vocab, d) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, ref.to(dtype), rtol=1e-3, atol=1e-3)
    if padding_idx is not None:
        assert torch.equal(out[padding_idx], torch.zeros_like(out[padding_idx]))
    unused = torch.ones(vocab, dtype=torch.bool, device=DEVICE)
    unused[ids.long()] = False
    assert torch.equal(out[unused], torch.zeros_like(out[unused]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_embed_scale(dtype, symmetric, deterministic):
    """grad = embed_scale * (grad rows summed per id)."""
    vocab, n, d = 13, 30, 70
    scale = _embed_scale(d, dtype)
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    ids[:4] = 2
    grad = torch.randn(2 * n if symmetric else n, d, device=DEVICE).to(dtype)
    kw = dict(padding_idx=5, symmetric=symmetric)
    out = BACKEND.embedding_backward(grad, ids, vocab, deterministic=deterministic,
                                     embed_scale=scale, **kw)
    ref = R.embedding_backward(grad, ids, vocab, embed_scale=scale, **kw)
    assert out.shape == (vocab, d) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(out, ref.to(dtype), rtol=1e-3, atol=1e-2)
    assert torch.equal(out[5], torch.zeros_like(out[5]))


def _assert_backward_close(got, ref):
    """Within float32 rounding of the reference's sums (one ulp after rounding to fp16)."""
    ref = ref.to(got.dtype)
    rtol = 1e-5 if got.dtype == torch.float32 else 2**-10
    atol = 1e-5 * float(ref.float().abs().max()) + 1e-4
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)


def _short_rows(ids, vocab):
    """Rows of ids with at most 32 tokens: summed serially in token order by one program (the
    reference's order: its bits)."""
    return torch.bincount(ids.long(), minlength=vocab) <= E._CHUNK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_deterministic_is_bit_identical(dtype):
    """Run to run the same bits; ids with <= 32 tokens get the reference's bits, a frequent
    id (a long run over several chunks, summed per chunk then combined) its sums to float32
    rounding."""
    vocab, n, d = 7, 150, 33
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    ids[torch.randperm(n, device=DEVICE)[:100]] = 4  # 100+ tokens: four chunks
    grad = torch.randn(2 * n, d, device=DEVICE).to(dtype)
    kw = dict(padding_idx=None, symmetric=True, deterministic=True)
    a = BACKEND.embedding_backward(grad, ids, vocab, **kw)
    b = BACKEND.embedding_backward(grad, ids, vocab, **kw)
    assert torch.equal(a, b)
    ref = R.embedding_backward(grad, ids, vocab, symmetric=True)
    short = _short_rows(ids, vocab)
    assert not short[4] and short.sum() >= 3
    assert torch.equal(a[short], ref[short].to(dtype))
    _assert_backward_close(a, ref)
    # the long run: its 32-token pieces, summed in chunk order (the CUDA kernels' bits too)
    assert torch.equal(a.cpu(), sorted_backward_sums(grad.cpu(), ids.cpu(), vocab,
                                                     symmetric=True))


def _skewed_ids(kind, n, vocab, gen):
    """90 % one token ("skewed"), every token the same ("one"), or runs whose lengths straddle
    the 32-position chunks ("boundary": 31, 33, 1, 34, 65, 2, 30 tokens, in order, so that
    they start at many offsets of a chunk). Ids vocab - 5 .. vocab - 1 never occur."""
    if kind == "one":
        return torch.full((n,), vocab // 2, dtype=torch.int64)
    if kind == "skewed":
        ids = torch.randint(0, vocab - 5, (n,), generator=gen)
        ids[torch.rand(n, generator=gen) < 0.9] = 1
        return ids[torch.randperm(n, generator=gen)]
    lengths = [31, 33, 1, 34, 65, 2, 30]
    ids = torch.cat([torch.full((m,), k % (vocab - 5)) for k, m in enumerate(lengths)])
    return torch.cat([ids, torch.randint(0, vocab - 5, (max(0, n - ids.numel()),),
                                         generator=gen)])[:n]


@pytest.mark.parametrize("kind", ["skewed", "one", "boundary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_skewed_ids(kind, dtype, deterministic, monkeypatch):
    """A frequent token (EOS / BOS) over many chunks, with pairs, embed_scale and padding:
    the reference's sums (to float32 rounding), the same bits run to run on the sorted path
    (fp16 always takes it), the reference's bits for ids with <= 32 tokens; rows without a
    token and padding_idx zero. The partial sums' buffer starts as NaN: only what the kernels
    wrote is read."""
    monkeypatch.setattr(E, "_partials", lambda rows, d, device: torch.full(
        (rows, d), float("nan"), device=device))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    vocab, d = 40, 37  # an odd width: masked columns
    n = {"skewed": 150, "one": 100, "boundary": 196}[kind]  # 3 to 7 chunks (interpreter)
    ids = _skewed_ids(kind, n, vocab, gen).to(DEVICE)
    grad = torch.randn(2 * n, d, generator=gen).to(dtype).to(DEVICE)
    # padding: a rare id, none, or a run across a chunk boundary
    padding_idx = {"skewed": 3, "one": None, "boundary": 3}[kind]
    kw = dict(padding_idx=padding_idx, symmetric=True, embed_scale=_embed_scale(d, dtype))
    got = BACKEND.embedding_backward(grad, ids, vocab, deterministic=deterministic, **kw)
    ref = R.embedding_backward(grad, ids, vocab, **kw)
    assert got.shape == (vocab, d) and got.dtype == dtype
    _assert_backward_close(got, ref)
    unused = torch.bincount(ids, minlength=vocab) == 0
    assert unused.any() and not got[unused].any()
    if padding_idx is not None:
        assert not got[padding_idx].any()
    if deterministic or dtype != torch.float32:  # the sorted path
        short = _short_rows(ids, vocab)
        assert torch.equal(got[short], ref[short].to(dtype))
        assert torch.equal(got.cpu(), sorted_backward_sums(grad.cpu(), ids.cpu(), vocab, **kw))
    if deterministic:
        again = BACKEND.embedding_backward(grad, ids, vocab, deterministic=True, **kw)
        assert torch.equal(got, again)


@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_empty_and_vocabulary_without_tokens(deterministic):
    vocab, d = 500, 9
    for dtype in (torch.float32, torch.float16):
        empty = BACKEND.embedding_backward(torch.zeros(0, d, device=DEVICE, dtype=dtype),
                                           torch.zeros(0, dtype=torch.long, device=DEVICE),
                                           vocab, padding_idx=None, symmetric=False,
                                           deterministic=deterministic)
        assert empty.shape == (vocab, d) and empty.dtype == dtype and not empty.any()
        ids = torch.randint(490, vocab, (45,), device=DEVICE)
        grad = torch.randn(45, d, device=DEVICE).to(dtype)
        got = BACKEND.embedding_backward(grad, ids, vocab, padding_idx=None, symmetric=False,
                                         deterministic=deterministic)
        _assert_backward_close(got, R.embedding_backward(grad, ids, vocab))
        assert not got[:490].any()


@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_has_no_vocabulary_sized_temporary(deterministic, monkeypatch):
    """fp16 grads: the sort and partial sums of ceil(N / 32) rows; no (V, d) buffer besides
    the result (every tensor torch allocates in the call, seen by a dispatch mode; not those
    the Triton interpreter makes while it runs a kernel)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes, self.paused = [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not self.paused:
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor):
                        self.bytes.append(t.numel() * t.element_size())
            return out

    seen = Allocations()

    class Unseen:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.paused = True
                try:
                    return self.kernel[grid](*args, **kw)
                finally:
                    seen.paused = False
            return launch

    for name in _KERNELS[E]:
        monkeypatch.setattr(E, name, Unseen(getattr(E, name)))
    vocab, n, d = 3000, 100, 16
    ids = torch.randint(0, 50, (n,), device=DEVICE)
    grad = torch.randn(n, d, device=DEVICE).half()
    with seen:
        got = BACKEND.embedding_backward(grad, ids, vocab, padding_idx=None, symmetric=False,
                                         deterministic=deterministic)
    result = vocab * d * 2
    assert got.numel() * got.element_size() == result
    assert seen.bytes.count(result) == 1
    others = [b for b in seen.bytes if b != result]
    assert sum(others) <= 16 * n + 4 * d * -(-n // 32) + 1024, others


@pytest.mark.parametrize("d", [1, 5, 300])
def test_backward_odd_widths(d):
    vocab, n = 11, 9
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    grad = torch.randn(n, d, device=DEVICE)
    for det in (False, True):
        out = BACKEND.embedding_backward(grad, ids, vocab, padding_idx=None, symmetric=False,
                                         deterministic=det)
        torch.testing.assert_close(out, R.embedding_backward(grad, ids, vocab), rtol=1e-5,
                                   atol=1e-5)


# --------------------------------------------------------------------------------------
# NoisyTune
# --------------------------------------------------------------------------------------
def _noisytune_both(tensors, lam, seed, offset):
    mine = [t.clone() for t in tensors]
    ref = [t.clone() for t in tensors]
    starts = R.noisytune_offsets([t.numel() for t in tensors], offset)
    BACKEND.noisytune_(mine, lam, seed=seed, starts=starts)
    R.noisytune_(ref, lam, seed=seed, offset=offset)
    return mine, ref


def _assert_noisytune_close(mine, ref, orig):
    for a, b, t in zip(mine, ref, orig):
        assert a.dtype == t.dtype and a.shape == t.shape
        if not torch.isfinite(t).all():
            assert torch.equal(a.isnan(), t.isnan()) and torch.equal(a.nan_to_num(), t.nan_to_num())
            continue
        # every backend takes the float64 std, rounded once to float32 (contract C2): exact
        assert torch.equal(a, b)


def test_noisytune_matches_reference():
    tensors = [
        torch.randn(5, 7), torch.randn(1), torch.zeros(10), torch.full((6,), 2.5),
        torch.randn(3, 33).half(), torch.randn(4, 4, 4) * 30, torch.randn(2),
        torch.randn(70001),  # three chunks: partials merged by the last one to arrive
        torch.tensor([1.0, float("nan"), 2.0]), torch.randn(0), torch.randn(1000).half(),
    ]
    tensors = [t.to(DEVICE) for t in tensors]
    mine, ref = _noisytune_both(tensors, 0.15, seed=2024, offset=17)
    _assert_noisytune_close(mine, ref, tensors)
    # skipped tensors are untouched, bit for bit
    for k in (1, 2, 3, 8, 9):
        assert torch.equal(mine[k].nan_to_num(), tensors[k].nan_to_num())
    assert not torch.equal(mine[0], tensors[0])


def test_noisytune_large_mean_std():
    # std 1e-3 on a mean of 1000: a sum-of-squares variance would be lost to cancellation
    t = (1000.0 + 1e-3 * torch.randn(50000, dtype=torch.float64)).float().to(DEVICE)
    lam = 1000.0  # noise half-width 0.5 * lam * std = 0.5, far above the fp32 ulp of 1000
    (mine,), (ref,) = _noisytune_both([t], lam, seed=5, offset=2**64 - 100)
    _assert_noisytune_close([mine], [ref], [t])
    u = R.uniform01(R.noise_words(5, 2**64 - 100, (t.numel() + 3) // 4, DEVICE)).reshape(-1)
    u = u[: t.numel()].double() - 0.5
    s = ((mine.double() - t.double()) * u).sum() / (u * u).sum()  # least-squares slope
    true_std = t.double().std().item()
    assert abs(s.item() / (lam * true_std) - 1.0) < 1e-3


def test_noisytune_many_tensors_and_offsets():
    sizes = [1, 2, 3, 4, 5, 7, 8, 31, 64, 100, 129, 255, 513] * 4
    tensors = [(torch.randn(n) * (k + 1) + k).to(DEVICE) for k, n in enumerate(sizes)]
    tensors = [t.half() if k % 3 == 1 else t for k, t in enumerate(tensors)]
    for offset in (0, 2**32 - 40, 2**64 - 50):
        mine, ref = _noisytune_both(tensors, 0.3, seed=2**64 - 1, offset=offset)
        _assert_noisytune_close(mine, ref, tensors)


def test_noisytune_unaligned_views():
    # views one element into a buffer start off 16 bytes: the launch takes the unvectorized
    # path (ALIGNED off) and must give the same numbers
    base = torch.randn(3 * 2049, device=DEVICE)
    half = torch.randn(2100, device=DEVICE).half()
    tensors = [base[1:2049], half[3:2052], base[2 * 2049:]]
    assert all(t.data_ptr() % 16 for t in tensors)  # both the fp32 and the fp16 launch
    mine, ref = _noisytune_both(tensors, 0.2, seed=11, offset=3)
    _assert_noisytune_close(mine, ref, tensors)


def test_noisytune_empty_list_and_only_skipped():
    BACKEND.noisytune_([], 0.1, seed=0, starts=[])
    t = torch.zeros(3, device=DEVICE)
    BACKEND.noisytune_([t], 0.1, seed=0, starts=[0])
    assert torch.equal(t, torch.zeros(3, device=DEVICE))


def _c2_noisytune(t, lam, seed, start, std=None):
    """Contract C2, spelled out in torch: std64 from the float64 values (two-pass), then
    s = float32(float32(lam) * float32(std64)); skip n < 2 and s not finite or 0."""
    n = t.numel()
    if n < 2:
        return t.clone()
    if std is None:
        x = t.double().reshape(-1)
        std = ((x - x.mean()) ** 2).sum().div(n - 1).sqrt().item()
    s = torch.tensor(lam, dtype=torch.float32) * torch.tensor(std, dtype=torch.float64).float()
    if not torch.isfinite(s) or s == 0:
        return t.clone()
    u = R.uniform01(R.noise_words(seed, start, (n + 3) // 4, t.device)).reshape(-1)[:n]
    return (t.float().reshape(-1) + (u - 0.5) * s.to(t.device)).to(t.dtype).reshape(t.shape)


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16}[t.dtype])


def _assert_c2(tensors, lam, seed, offset, stds=None):
    mine = [t.clone() for t in tensors]
    starts = R.noisytune_offsets([t.numel() for t in tensors], offset)
    BACKEND.noisytune_(mine, lam, seed=seed, starts=starts, stds=stds)
    for k, (a, t, start) in enumerate(zip(mine, tensors, starts)):
        want = _c2_noisytune(t, lam, seed, start, None if stds is None else stds[k])
        assert torch.equal(_bits(a), _bits(want)), f"tensor {k}: {(a - want).abs().max()}"
    return mine


def _huge_and_odd_tensors():
    big = torch.randn(300).clamp(-3, 3)
    return [
        big * 1e18,  # float32 sums of squares overflow from here
        big * 1e37,  # near the float32 limit: the squares exist only in float64
        torch.tensor([3.0e38, -3.0e38, 1.0]),  # std64 ~3e38: s = 0.15 * std is finite
        torch.randn(70001) * 2 + 5,  # three chunks: partials merged by the last to arrive
        1000.0 + 1e-3 * torch.randn(5000),  # a large mean over a small std
        torch.full((40,), 2.5), torch.zeros(9),  # std 0: unchanged
        torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([float("-inf")] * 4),
        torch.tensor([1.0, float("nan"), 2.0]),
        torch.randn(1), torch.randn(0), torch.randn(2), torch.randn(3, 33),
        (torch.randn(3, 33) * 100).half(), torch.full((7,), 3.0).half(), torch.randn(1).half(),
        torch.randn(1000).half(), torch.tensor([60000.0, -60000.0, 1.0]).half(),
    ]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/NaN (interpreter)
def test_noisytune_statistics_match_c2_bit_for_bit():
    tensors = [t.to(DEVICE) for t in _huge_and_odd_tensors()]
    mine = _assert_c2(tensors, 0.15, seed=2024, offset=17)
    for k in (0, 1, 2, 3, 4, 12, 13, 14, 17, 18):  # perturbed: finite s, nonzero
        assert not torch.equal(mine[k], tensors[k]), k


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/NaN (interpreter)
def test_noisytune_s_overflow_leaves_the_tensor_unchanged():
    t = torch.tensor([3.0e38, -3.0e38, 0.0], device=DEVICE)  # std64 3e38, lam * std = inf
    mine = _assert_c2([t, torch.randn(50, device=DEVICE)], 10.0, seed=1, offset=0)
    assert torch.equal(mine[0], t)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/NaN (interpreter)
def test_noisytune_given_stds():
    """C5: stds[k] replaces the computed std64 (fp32 and fp16 launches, no stats pass)."""
    tensors = [t.to(DEVICE) for t in _huge_and_odd_tensors()]
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    stds = [float(torch.rand((), generator=gen, dtype=torch.float64)) * 10 ** k
            for k in range(len(tensors))]
    stds[5], stds[6], stds[10] = 0.0, float("inf"), 3.0  # unchanged, unchanged, n = 1
    _assert_c2(tensors, 0.2, seed=7, offset=2**64 - 30, stds=stds)
    _assert_c2(tensors[::-1], 0.2, seed=8, offset=3, stds=[1.5] * len(tensors))


def test_noisytune_given_std_is_used_as_is():
    t = torch.randn(5000, device=DEVICE)
    (a,) = _assert_c2([t], 0.1, seed=3, offset=0, stds=[2.0])
    u = R.uniform01(R.noise_words(3, 0, 1250, DEVICE)).reshape(-1) - 0.5
    slope = ((a.double() - t.double()) * u.double()).sum() / (u.double() ** 2).sum()
    assert abs(slope.item() / 0.2 - 1) < 1e-5  # lam * 2.0, not lam * std(t) ~ 0.1


def test_noisytune_argument_lengths():
    t = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="1 tensors, 2 starts"):
        BACKEND.noisytune_([t], 0.1, seed=0, starts=[0, 3])
    with pytest.raises(ValueError, match="0 stds"):
        BACKEND.noisytune_([t], 0.1, seed=0, starts=[0], stds=[])


# --------------------------------------------------------------------------------------
# every launch on the tensors' device (and so on that device's current stream)
# --------------------------------------------------------------------------------------
def test_device_guard():
    assert isinstance(E.device_guard(torch.device("cpu")), type(contextlib.nullcontext()))
    guard = E.device_guard(torch.device("cuda", 1))  # building it needs no CUDA
    assert guard.idx == 1 and hasattr(guard, "__enter__")


_KERNELS = {E: ("_noisy_embedding_fwd_kernel", "_embedding_bwd_atomic_kernel",
                "_embedding_bwd_chunk_kernel", "_embedding_bwd_combine_kernel"),
            NT: ("_noisytune_stats_kernel", "_noisytune_merge_kernel",
                 "_noisytune_perturb_kernel")}


def test_every_launch_runs_under_the_tensors_device_guard(monkeypatch):
    """A spy on the guard and the launches: each launch happens inside a guard of the
    device its tensors are on (the real guard is torch's device guard on CUDA)."""
    events, held = [], []

    class SpyGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            held.append(self.device)

        def __exit__(self, *exc):
            held.pop()

    class SpyKernel:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                events.append((self.name, list(held), {t.device for t in tensors}))
                return self.kernel[grid](*args, **kw)
            return launch

    for mod, names in _KERNELS.items():
        monkeypatch.setattr(mod, "device_guard", SpyGuard)
        for name in names:
            monkeypatch.setattr(mod, name, SpyKernel(name, getattr(mod, name)))
    weight = torch.randn(11, 40, device=DEVICE)
    ids = torch.randint(0, 11, (40,), device=DEVICE)  # two chunks: both sorted kernels
    error = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    out = _forward(ids, weight, noise="uniform", mag=0.1, error=error)
    for det in (False, True):
        BACKEND.embedding_backward(out, ids, 11, padding_idx=None, symmetric=False,
                                   deterministic=det)
    BACKEND.noisytune_([weight, torch.randn(9, device=DEVICE).half()], 0.1, seed=1,
                       starts=[0, 200])
    launched = [e[0] for e in events]
    assert launched == ["_noisy_embedding_fwd_kernel", "_embedding_bwd_atomic_kernel",
                        "_embedding_bwd_chunk_kernel", "_embedding_bwd_combine_kernel"] + [
        "_noisytune_stats_kernel", "_noisytune_merge_kernel", "_noisytune_perturb_kernel"] * 2
    for name, guards, devices in events:
        assert guards == [DEVICE] and devices == {DEVICE}, (name, guards, devices)


# --------------------------------------------------------------------------------------
# GPU only: bf16 and realistic shapes
# --------------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_forward_bf16_large(noise, symmetric):
    vocab, d = 32000, 4096
    weight = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (2, 1024), device="cuda")
    mag = R.noise_scale(5.0, 1024, d)
    kw = dict(noise=noise, mag=mag, seed=2**64 - 3, offset=2**32 - 1000, symmetric=symmetric)
    out = _forward(ids, weight, **kw)
    ref = R.noisy_embedding(ids.reshape(-1), weight, **kw)
    if noise == "gaussian":
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-5)
    else:
        assert torch.equal(out, ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_forward_embed_scale_large(noise, dtype):
    vocab, d = 32000, 2048
    weight = torch.randn(vocab, d, device="cuda", dtype=dtype)
    ids = torch.randint(0, vocab, (2, 1024), device="cuda")
    kw = dict(noise=noise, mag=R.noise_scale(5.0, 1024, d), seed=2**64 - 3,
              offset=2**32 - 1000, symmetric=True, embed_scale=_embed_scale(d, dtype))
    out = _forward(ids, weight, **kw)
    ref = R.noisy_embedding(ids.reshape(-1), weight, **kw)
    if noise == "gaussian":
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-5)
    else:
        assert torch.equal(out, ref)
    grad = torch.randn(2 * ids.numel(), d, device="cuda").to(dtype)
    for det in (False, True):
        got = BACKEND.embedding_backward(grad, ids.reshape(-1), vocab, padding_idx=0,
                                         symmetric=True, deterministic=det,
                                         embed_scale=kw["embed_scale"])
        want = R.embedding_backward(grad, ids.reshape(-1), vocab, padding_idx=0, symmetric=True,
                                    embed_scale=kw["embed_scale"]).to(dtype)
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype ==
                                   torch.bfloat16 else 1e-5, atol=1e-2 if dtype ==
                                   torch.bfloat16 else 1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("noise", NOISES)
def test_gpu_noise_matches_reference_fp32(noise):
    n, d = 4096, 768
    out = _forward(torch.zeros(n, dtype=torch.long, device="cuda"),
                   torch.zeros(1, d, device="cuda"), noise=noise, mag=1.0, seed=99, offset=5)
    xi = R.draw_noise(noise, n, d, 99, 5, device="cuda")
    if noise == "gaussian":
        torch.testing.assert_close(out, xi, rtol=1e-6, atol=2e-6)
    else:
        assert torch.equal(out, xi)


@gpu
@needs_cuda
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backward_large(deterministic, dtype):
    vocab, n, d = 32000, 8192, 1024
    ids = torch.randint(0, 500, (n,), device="cuda")  # many repeats
    grad = torch.randn(2 * n, d, device="cuda").to(dtype)
    out = BACKEND.embedding_backward(grad, ids, vocab, padding_idx=0, symmetric=True,
                                     deterministic=deterministic)
    ref = R.embedding_backward(grad, ids, vocab, padding_idx=0, symmetric=True)
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=1e-2 if dtype ==
                               torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16
                               else 1e-4)
    if deterministic:
        again = BACKEND.embedding_backward(grad, ids, vocab, padding_idx=0, symmetric=True,
                                           deterministic=True)
        assert torch.equal(out, again)


@gpu
@needs_cuda
def test_gpu_noisytune_mixed_dtypes():
    tensors = [torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16),
               torch.randn(3000, 7, device="cuda"), torch.randn(17, device="cuda").half(),
               1000 + 1e-3 * torch.randn(2_000_000, device="cuda")]
    mine, ref = _noisytune_both(tensors, 0.15, seed=7, offset=2**64 - 1000)
    _assert_noisytune_close(mine, ref, tensors)


@gpu
@needs_cuda
@pytest.mark.parametrize("noise", NOISES)
def test_gpu_seed_tensor_equals_seed(noise):
    """The seed read from a device tensor gives the reference's noise for that seed at
    offset 0 (the host seed and offset ignored), and the same bits as the seed path."""
    vocab, n, d = 1000, 300, 768
    weight = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (n,), device="cuda")
    for seed in (3, 2**63 + 5, 2**64 - 5):
        kw = dict(noise=noise, mag=0.05, symmetric=True)
        want = _forward(ids, weight, seed=seed, offset=0, **kw)
        got = _forward(ids, weight, seed=1, offset=99, **kw,
                       seed_tensor=torch.tensor([_as_i64(seed)], device="cuda"))
        ref = R.noisy_embedding(ids, weight, seed=seed, offset=0, **kw)
        if noise == "gaussian":  # ~1e-6 in float32, then one bf16 ulp
            torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-5)
        else:
            assert torch.equal(got, ref)
        assert torch.equal(got, want)


@gpu
@needs_cuda
@pytest.mark.parametrize("noise", NOISES)
def test_gpu_cuda_graph_replays_draw_new_noise(noise):
    vocab, n, d = 500, 64, 256
    weight = torch.randn(vocab, d, device="cuda")
    ids = torch.randint(0, vocab, (n,), device="cuda")
    out = torch.empty(2 * n, d, device="cuda")
    kw = dict(noise=noise, mag=0.1, tok_mag=None, seed=0, offset=0, symmetric=True)

    def step():
        st = torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cuda")
        BACKEND.embedding_forward(ids, weight, out, seed_tensor=st, **kw)
        return st

    graph, st = cuda_graphs.capture(step)
    seeds, outs = zip(*cuda_graphs.replay(graph, lambda: (int(st.item()), out.clone())))
    assert seeds[0] != seeds[1] and not torch.equal(outs[0], outs[1])
    for o, s in zip(outs, seeds):
        ref = R.noisy_embedding(ids, weight, noise=noise, mag=0.1, seed=s, offset=0,
                                symmetric=True)
        _check(o, ref, noise, 1.0)


@triton.jit
def _wait_for_flag(flag_ptr, limit):
    """Polls a pinned host flag until the host sets it (at most ``limit`` polls): holds back
    everything queued after it on its stream."""
    i = 0
    while (tl.load(flag_ptr, volatile=True) == 0) & (i < limit):
        i += 1


@gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_launches_go_to_the_current_stream(symmetric):
    """Forward and backward on a side stream held back by a gate: the default stream (which
    does not wait for the side one) still sees the poisoned output, so the work is queued on
    the side stream; once the gate opens, the results are right."""
    vocab, n, d = 1000, 300, 520
    weight = torch.randn(vocab, d, device="cuda")
    ids = torch.randint(0, vocab, (n,), device="cuda")
    ids[7] = vocab
    kw = dict(noise="uniform", mag=0.1, tok_mag=None, seed=5, offset=9, symmetric=symmetric)
    rows = 2 * n if symmetric else n
    out = torch.empty(rows, d, device="cuda")
    error = torch.zeros(4, dtype=torch.int64, device="cuda")
    grad = torch.randn(rows, d, device="cuda")
    bwd = dict(padding_idx=None, symmetric=symmetric)
    flag = torch.zeros(1, dtype=torch.int32).pin_memory()
    # compile everything before the gate closes (a compile inside would only slow the test)
    _wait_for_flag[(1,)](flag, 16)  # 16 and 2**30 share a specialization (1 would not)
    BACKEND.embedding_forward(ids, weight, out, error=error.clone(), **kw)
    for det in (False, True):
        BACKEND.embedding_backward(grad, ids, vocab, deterministic=det, **bwd)
    out.fill_(float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _wait_for_flag[(1,)](flag, 2**30)
        BACKEND.embedding_forward(ids, weight, out, error=error, **kw)
        grads = [BACKEND.embedding_backward(grad, ids, vocab, deterministic=det, **bwd)
                 for det in (False, True)]
    peek_out, peek_error = out.clone(), error.clone()  # on the default stream
    torch.cuda.current_stream().synchronize()
    flag[0] = 1
    side.synchronize()
    assert peek_out.isnan().all() and not peek_error.any()
    assert error.tolist()[:3] == [1, vocab, vocab]
    is_bad = ids == vocab
    row_bad = torch.cat([is_bad, is_bad]) if symmetric else is_bad
    ref = R.noisy_embedding(torch.where(is_bad, 0, ids), weight, **kw)
    assert out[row_bad].isnan().all() and torch.equal(out[~row_bad], ref[~row_bad])
    keep = ~is_bad
    g = grad.reshape(2, n, d)[:, keep].reshape(-1, d) if symmetric else grad[keep]
    want = R.embedding_backward(g, ids[keep], vocab, **bwd)
    for got in grads:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@gpu
@needs_cuda
def test_gpu_noisytune_on_a_side_stream():
    tensors = [torch.randn(70001, device="cuda") * 1e18, torch.randn(77, device="cuda").half()]
    mine = [t.clone() for t in tensors]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        BACKEND.noisytune_(mine, 0.1, seed=3, starts=[0, 20000])
    side.synchronize()
    for a, t, start in zip(mine, tensors, [0, 20000]):
        assert torch.equal(_bits(a), _bits(_c2_noisytune(t, 0.1, 3, start)))


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tensors_on_a_device_that_is_not_current():
    """device_map="auto" puts layers on cuda:1 while cuda:0 is current: an unguarded Triton
    launch would run on cuda:0 with cuda:1's pointers (an illegal memory access)."""
    dev = torch.device("cuda", 1)
    vocab, n, d = 500, 200, 264
    weight = torch.randn(vocab, d, device=dev)
    ids = torch.randint(0, vocab, (n,), device=dev)
    ids[0] = -1
    grad = torch.randn(2 * n, d, device=dev)
    tensors = [torch.randn(40000, device=dev), torch.randn(9, 7, device=dev).half()]
    kw = dict(noise="gaussian", mag=0.1, seed=11, offset=0, symmetric=True)
    with torch.cuda.device(0):
        error = torch.zeros(4, dtype=torch.int64, device=dev)
        out = _forward(ids, weight, error=error, **kw)
        grads = [BACKEND.embedding_backward(grad, ids, vocab, padding_idx=3, symmetric=True,
                                            deterministic=det) for det in (False, True)]
        mine = [t.clone() for t in tensors]
        BACKEND.noisytune_(mine, 0.2, seed=4, starts=[0, 10000])
        torch.cuda.synchronize(dev)
        assert torch.cuda.current_device() == 0
    assert error.tolist()[:3] == [1, -1, vocab]
    ref = R.noisy_embedding(torch.where(ids < 0, 0, ids), weight, **kw)
    assert out[[0, n]].isnan().all()
    keep = torch.ones(2 * n, dtype=torch.bool, device=dev)
    keep[[0, n]] = False
    _check(out[keep], ref[keep], "gaussian", 0.1)
    want = R.embedding_backward(grad.reshape(2, n, d)[:, 1:].reshape(-1, d), ids[1:], vocab,
                                padding_idx=3, symmetric=True)
    for got in grads:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for a, t, start in zip(mine, tensors, [0, 10000]):
        assert torch.equal(_bits(a), _bits(_c2_noisytune(t, 0.2, 4, start)))
