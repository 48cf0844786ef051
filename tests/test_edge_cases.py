"""Edges: empty and odd inputs, loose arguments, precision, second-order gradients, bad ids
found on the device, and the ops called directly (they are public entry points)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastnoise
from fastnoise import reference as R

from op_args import call_backward, call_forward

BACKENDS = fastnoise.available_backends("cpu", torch.float32)


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu", [[0, 0, 0, 2], [0, 1, 1, 1, 2], [0, 2, 2], [0, 0, 1, 1, 2, 2]])
def test_cu_seqlens_with_empty_sequences(backend, cu):
    weight, ids = torch.randn(5, 4), torch.tensor([1, 2])
    out = fastnoise.noisy_embedding(ids, weight, seed=1, cu_seqlens=torch.tensor(cu),
                                    backend=backend)
    lengths = torch.tensor(cu).diff()
    per_token = torch.repeat_interleave(lengths, lengths)
    xi = R.draw_noise("uniform", 2, 4, 1)
    for t in range(2):
        mag = torch.tensor(R.noise_scale(5.0, int(per_token[t]), 4))
        assert torch.equal(out[t], weight[ids[t]] + xi[t] * mag)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_packing_is_found_on_the_device(backend):
    ids, weight = torch.randint(0, 9, (2, 6)), torch.randn(9, 8)
    for bad in (torch.tensor([0, 3, 11]), torch.tensor([1, 12]), torch.tensor([0, 8, 5, 12]),
                torch.tensor([0, 12, 13])):
        with pytest.raises(fastnoise.BadPackingError, match="cu_seqlens"):
            fastnoise.noisy_embedding(ids, weight, cu_seqlens=bad, backend=backend)
    pos = torch.arange(6).repeat(2, 1)
    pos[1, 4] = -1
    with pytest.raises(ValueError, match="position_ids must be >= 0"):
        fastnoise.noisy_embedding(ids, weight, position_ids=pos, backend=backend)
    # reported once: the next good call runs
    fastnoise.noisy_embedding(ids, weight, position_ids=pos.abs(), backend=backend)


def test_position_ids_and_cu_seqlens_together_raise():
    ids, weight = torch.randint(0, 9, (1, 6)), torch.randn(9, 8)
    with pytest.raises(ValueError, match="not both"):
        fastnoise.noisy_embedding(ids, weight, position_ids=torch.arange(6)[None],
                                  cu_seqlens=torch.tensor([0, 6]))


# --------------------------------------------------------------------------------------
# Precision and gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS
                                     if b in fastnoise.available_backends("cpu", torch.float64)])
def test_float64_gradient_keeps_float64_precision(backend):
    weight = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 1])
    out = fastnoise.noisy_embedding(ids, weight, alpha=0.0, backend=backend)
    out.backward(torch.tensor([[1.0, 1.0], [2e-9, 2e-9]], dtype=torch.float64))
    assert weight.grad.dtype == torch.float64
    assert weight.grad[1, 0].item() == 1.0 + 2e-9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_double_backward_is_a_gather(backend, symmetric):
    dtype = torch.float64 if backend in fastnoise.available_backends(
        "cpu", torch.float64) else torch.float32
    weight = torch.randn(7, 5, dtype=dtype, requires_grad=True)
    ids = torch.tensor([[1, 3, 3, 0], [6, 1, 2, 2]])
    kwargs = dict(alpha=0.5, seed=3, symmetric=symmetric, padding_idx=2, embed_scale=1.5)
    out = fastnoise.noisy_embedding(ids, weight, backend=backend, **kwargs)
    expect_out = fastnoise.noisy_embedding(ids, weight, backend="reference", **kwargs)
    g = torch.randn_like(out, requires_grad=True)
    (gw,) = torch.autograd.grad(out, weight, g, create_graph=True)
    (gw_ref,) = torch.autograd.grad(expect_out, weight, g, create_graph=True)
    v = torch.randn_like(gw)
    (gg,) = torch.autograd.grad(gw, g, v)
    (gg_ref,) = torch.autograd.grad(gw_ref, g, v)
    torch.testing.assert_close(gg, gg_ref)
    assert gg.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_empty_batch_backward_like_f_embedding(backend, shape):
    weight = torch.randn(6, 4, requires_grad=True)
    ids = torch.zeros(shape, dtype=torch.long)
    out = fastnoise.noisy_embedding(ids, weight, backend=backend)
    assert out.shape == F.embedding(ids, weight).shape and out.requires_grad
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_width_weight(backend, symmetric):
    weight = torch.randn(6, 0, requires_grad=True)
    ids = torch.randint(0, 6, (2, 3))
    out = fastnoise.noisy_embedding(ids, weight, backend=backend, symmetric=symmetric)
    assert out.shape == ((4 if symmetric else 2), 3, 0)
    out.sum().backward()
    assert weight.grad.shape == (6, 0)
    assert R.noise_scale(5.0, 3, 0) == 0.0


# --------------------------------------------------------------------------------------
# Loose arguments
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_idx", [1.5, 1.0, True, "1", torch.tensor(1.0)])
def test_padding_idx_must_be_an_integer(padding_idx):
    with pytest.raises(TypeError, match="padding_idx"):
        fastnoise.noisy_embedding(torch.tensor([1]), torch.randn(4, 3), padding_idx=padding_idx)


def test_padding_idx_accepts_integer_types():
    weight = torch.randn(4, 3, requires_grad=True)
    for p in (1, np.int64(1), -3):
        out = fastnoise.noisy_embedding(torch.tensor([1, 2]), weight, padding_idx=p, seed=1)
        (g,) = torch.autograd.grad(out.sum(), weight)
        assert torch.equal(g[1], torch.zeros(3))


def test_numpy_integer_seeds():
    weight, ids = torch.randn(5, 4), torch.tensor([1, 2])
    a = fastnoise.noisy_embedding(ids, weight, seed=np.uint64(2**63 + 1))
    assert torch.equal(a, fastnoise.noisy_embedding(ids, weight, seed=2**63 + 1))
    b = fastnoise.noisy_embedding(ids, weight, seed=np.int32(7))
    assert torch.equal(b, fastnoise.noisy_embedding(ids, weight, seed=7))
    for bad in (1.0, "3", True):
        with pytest.raises(TypeError, match="seed"):
            fastnoise.noisy_embedding(ids, weight, seed=bad)
    with pytest.raises(TypeError, match="seed"):
        fastnoise.noisytune_([torch.randn(3)], seed=2.0)


@pytest.mark.parametrize("method", ["", "NEFTune", None, 3])
def test_unknown_methods_raise(method):
    with pytest.raises(ValueError, match="unknown method"):
        fastnoise.functional.check_method(method)


# --------------------------------------------------------------------------------------
# Bad ids: found by the kernels, reported as a Python error naming the id and the size
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 10, 2**40])
def test_bad_ids_raise_naming_the_id_and_size(backend, bad):
    weight = torch.randn(10, 4)
    ids = torch.tensor([[1, bad, 3]])
    with pytest.raises(IndexError, match=rf"{bad}.*\[0, 10\)"):
        fastnoise.noisy_embedding(ids, weight, backend=backend)
    fastnoise.check_errors()  # nothing left over
    out = fastnoise.noisy_embedding(ids.clamp(0, 9), weight, backend=backend)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------
# The ops called directly check their arguments (no out-of-bounds reads, no silent skips)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_rejects_bad_forward_arguments(backend):
    weight, ids = torch.randn(9, 8), torch.randint(0, 9, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.long)
    cases = [  # (arguments changed, error, message)
        (dict(attention_mask=mask[:, :2]), ValueError, "attention_mask must have the shape"),
        (dict(position_ids=mask.reshape(-1)), ValueError, "position_ids must have the shape"),
        (dict(attention_mask=mask.float()), TypeError, "attention_mask must be bool or int"),
        (dict(position_ids=mask, cu_seqlens=torch.tensor([0, 6])), ValueError, "not both"),
        (dict(cu_seqlens=torch.tensor([[0, 6]])), ValueError, "cu_seqlens must be a 1-D"),
        (dict(cu_seqlens=torch.tensor([0.0, 6.0])), ValueError, "cu_seqlens must be a 1-D"),
        (dict(ids=ids.float()), TypeError, "ids must be int32 or int64"),
        (dict(weight=weight.long()), TypeError, "weight must be floating point"),
        (dict(weight=weight[None]), ValueError, "weight must be 2-D"),
        (dict(noise=7), ValueError, "noise code"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(ids=torch.tensor(3), symmetric=True), ValueError, "symmetric=True needs"),
        (dict(padding_idx=9), ValueError, "padding_idx"),
        (dict(padding_idx=-2), ValueError, "padding_idx"),
    ]
    for change, error, match in cases:
        kw = dict(weight=weight, ids=ids)
        kw.update(change)
        with pytest.raises(error, match=match):
            call_forward(backend, kw.pop("weight"), kw.pop("ids"), **kw)
    # a column-strided weight is read as its contiguous copy, not refused
    strided = torch.randn(8, 9).t()
    assert torch.equal(call_forward(backend, strided, ids),
                       call_forward(backend, strided.contiguous(), ids))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_op_rejects_bad_backward_arguments(backend, symmetric):
    ids = torch.randint(0, 9, (2, 3))
    rows = 4 if symmetric else 2
    for grad in (torch.randn(rows - 1, 3, 4), torch.randn(rows, 2, 4), torch.randn(rows * 12)):
        with pytest.raises(ValueError, match="grad_out"):
            call_backward(backend, grad, ids, 9, symmetric=symmetric)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        call_backward(backend, torch.randn(rows, 3, 4), ids.float(), 9, symmetric=symmetric)
    with pytest.raises(ValueError, match="num_weights"):
        call_backward(backend, torch.randn(rows, 3, 4), ids, -1, symmetric=symmetric)
    good = call_backward(backend, torch.randn(rows, 3, 4), ids, 9, symmetric=symmetric)
    assert good.shape == (9, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_rejects_fewer_starts_than_tensors(backend):
    tensors = [torch.randn(5, 3), torch.randn(4)]
    before = [t.clone() for t in tensors]
    op = torch.ops.fastnoise.apply_noisytune_
    with pytest.raises(ValueError, match="one start counter per tensor"):
        op(tensors, 0.15, 1, [0], backend)
    with pytest.raises(ValueError, match="one device and dtype"):
        op([tensors[0], tensors[1].double()], 0.15, 1, [0, 4], backend)
    with pytest.raises(ValueError, match="contiguous"):
        op([tensors[0].t()], 0.15, 1, [0], backend)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


# --------------------------------------------------------------------------------------
# NoisyTune: one statistics rule (float64 std) for every backend
# --------------------------------------------------------------------------------------
def _c2(t: torch.Tensor, lam: float, seed: int, start: int) -> torch.Tensor:
    """Contract C2 written out literally, for one tensor."""
    n = t.numel()
    if n < 2:
        return t.clone()
    x64 = t.reshape(-1).to(torch.float64)
    std64 = math.sqrt(float(((x64 - x64.mean()) ** 2).sum()) / (n - 1))
    u = R.uniform01(R.noise_words(seed, start, (n + 3) // 4)).reshape(-1)[:n]
    if t.dtype == torch.float64:
        s = lam * std64
        if not math.isfinite(s) or s == 0:
            return t.clone()
        return (x64 + (u.double() - 0.5) * s).reshape(t.shape)
    s = torch.tensor(lam, dtype=torch.float32) * torch.tensor(std64, dtype=torch.float32)
    if not torch.isfinite(s) or s == 0:
        return t.clone()
    return (t.reshape(-1).float() + (u - 0.5) * s).to(t.dtype).reshape(t.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noisytune_statistics_rule(backend):
    dtypes = [d for d in (torch.float32, torch.float16, torch.float64)
              if backend in fastnoise.available_backends("cpu", d, op="noisytune")]
    for dtype in dtypes:
        big = torch.finfo(dtype).max / 4 if dtype != torch.float64 else 1e200
        tensors = [torch.randn(40, 9, dtype=dtype) * 3 + 1e3 if dtype != torch.float16 else
                   torch.randn(40, 9, dtype=dtype) * 3 + 100,
                   torch.full((17,), 2.5, dtype=dtype),                  # constant
                   torch.tensor([1.0], dtype=dtype),                     # one element
                   torch.tensor([0.0, big, -big], dtype=dtype),          # huge std
                   torch.tensor([1.0, math.inf, 2.0], dtype=dtype),      # inf
                   torch.randn(1001, dtype=dtype) * 1e-3]
        if dtype == torch.float32:
            tensors.append(torch.randn(64, dtype=dtype) * 1e18)
        expect = []
        start = 0
        for t in tensors:
            expect.append(_c2(t, 0.15, 11, start))
            start += (t.numel() + 3) // 4
        work = [t.clone() for t in tensors]
        fastnoise.noisytune_(work, 0.15, seed=11, backend=backend)
        for k, (w, e) in enumerate(zip(work, expect)):
            # float64: stds from other summation orders may differ in the last bit
            assert torch.equal(w, e) or (dtype == torch.float64 and torch.allclose(
                w, e, rtol=0, atol=1e-15 * float(e.abs().max()))), (dtype, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_bad_ids_surface_at_the_next_call_or_check_errors(backend):
    if backend not in fastnoise.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    weight = torch.randn(10, 64, device="cuda")
    bad = torch.tensor([[1, 12, 3]], device="cuda")
    good = torch.tensor([[1, 2, 3]], device="cuda")
    out = fastnoise.noisy_embedding(bad, weight, backend=backend)  # no sync: no raise here
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2]]).all()
    with pytest.raises(IndexError, match=r"token id 12 is out of range \[0, 10\)"):
        fastnoise.check_errors()
    fastnoise.noisy_embedding(bad, weight, backend=backend)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="earlier fastnoise call"):
        fastnoise.noisy_embedding(good, weight, backend=backend)
    fastnoise.check_errors()  # reported once
    assert torch.isfinite(fastnoise.noisy_embedding(good, weight, backend=backend)).all()
    # the context survives: plain CUDA work still runs
    assert float((weight * 2).sum()) == pytest.approx(2 * float(weight.sum()), rel=1e-5)


def test_module_checks_its_arguments_when_built():
    with pytest.raises(TypeError, match="padding_idx"):
        fastnoise.NoisyEmbedding(10, 4, padding_idx=1.5)
    assert fastnoise.NoisyEmbedding(10, 4, padding_idx=np.int64(-1)).padding_idx == 9
    with pytest.raises(ValueError, match="unknown backend"):
        fastnoise.NoisyEmbedding(10, 4, backend="tpu")
    with pytest.raises(ValueError, match="embed_scale"):
        fastnoise.NoisyEmbedding(10, 4, embed_scale=math.nan)
    with pytest.raises(ValueError, match="unknown method"):
        fastnoise.NoisyEmbedding.from_embedding(torch.nn.Embedding(10, 4), method="")


def test_reported_copies_are_retired_not_reused_in_flight(monkeypatch):
    """After an error is reported, the async copies still in flight are retired: their values
    are never read, and their pinned buffers are reused only once their copy has completed
    (a copy landing in a recycled buffer would otherwise raise a stale error later). CUDA
    events cannot run here, so the state machine runs on events whose completion the test
    decides."""
    from fastnoise import errors

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    state = errors._state(torch.device("cpu"))
    monkeypatch.setattr(state, "pending", [])
    monkeypatch.setattr(state, "retired", [])
    monkeypatch.setattr(state, "spare", [])
    reported = (torch.tensor([1, 7, 10, 0]), Event(True))
    in_flight = (torch.zeros(4, dtype=torch.int64), Event(False))
    state.pending = [reported, in_flight]
    with pytest.raises(fastnoise.BadTokenIdError, match="token id 7"):
        errors._raise_from(state, reported[0].tolist(), "test")
    assert state.pending == [] and state.retired == [reported, in_flight]
    spare = state.take_spare()
    assert spare is reported  # complete: reused
    assert state.retired == [in_flight]  # still in flight: kept out of use
    in_flight[1].done = True
    assert state.take_spare() is in_flight
    state.buffer.zero_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["attention_mask", "position_ids", "cu_seqlens"])
def test_non_tensor_packing_inputs_raise_type_error(backend, name):
    """Every backend says the same of a list where a tensor belongs (the Python op's schema
    alone would raise a RuntimeError about casting)."""
    ids, weight = torch.randint(0, 9, (2, 3)), torch.randn(9, 4)
    with pytest.raises(TypeError, match=f"{name} must be a tensor, got list"):
        fastnoise.noisy_embedding(ids, weight, backend=backend, **{name: [[1, 1, 1], [1, 1, 0]]})
