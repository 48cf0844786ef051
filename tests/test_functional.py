"""The public functional API on the reference backend: semantics, gradients, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastnoise
from fastnoise import reference as R


def _inputs(batch=3, length=11, d=24, vocab=50, dtype=torch.float32):
    return torch.randint(0, vocab, (batch, length)), torch.randn(vocab, d, dtype=dtype)


@pytest.mark.parametrize("noise", fastnoise.NOISE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_formula(noise, dtype):
    ids, weight = _inputs(dtype=dtype)
    out = fastnoise.noisy_embedding(ids, weight, noise=noise, alpha=5.0, seed=42,
                                    backend="reference")
    mag = torch.tensor(5.0 / math.sqrt(11 * 24), dtype=torch.float64).float()
    xi = R.draw_noise(noise, ids.numel(), 24, 42)
    expect = (weight[ids.reshape(-1)].float() + xi * mag).to(dtype).view(3, 11, 24)
    assert out.dtype == dtype and torch.equal(out, expect)


def test_noise_magnitude_bounds():
    ids, weight = _inputs(length=16, d=64)
    mag = 5.0 / math.sqrt(16 * 64)
    n = fastnoise.noisy_embedding(ids, weight, seed=1) - weight[ids]
    assert n.abs().max() <= mag * (1 + 1e-6)
    n = fastnoise.noisy_embedding(ids, weight, seed=1, noise="bernoulli") - weight[ids]
    torch.testing.assert_close(n.abs(), torch.full_like(n, mag), rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_plain_embedding():
    ids, weight = _inputs()
    assert torch.equal(fastnoise.noisy_embedding(ids, weight, alpha=0.0), F.embedding(ids, weight))


@pytest.mark.parametrize("shape", [(7,), (2, 7), (2, 3, 7), (1, 1)])
def test_shapes_and_padded_length(shape):
    weight = torch.randn(30, 10)
    ids = torch.randint(0, 30, shape)
    out = fastnoise.noisy_embedding(ids, weight, seed=5)
    assert out.shape == shape + (10,)
    mag = R.noise_scale(5.0, shape[-1], 10)
    xi = R.draw_noise("uniform", ids.numel(), 10, 5)
    assert torch.equal(out.reshape(-1, 10), weight[ids.reshape(-1)] + xi * torch.tensor(mag))


def test_int32_ids_equal_int64_ids():
    ids, weight = _inputs()
    a = fastnoise.noisy_embedding(ids, weight, seed=9)
    b = fastnoise.noisy_embedding(ids.int(), weight, seed=9)
    assert torch.equal(a, b)


def test_attention_mask_lengths_and_no_noise_on_padding():
    ids, weight = _inputs(batch=3, length=8, d=16)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [0] * 8])
    out = fastnoise.noisy_embedding(ids, weight, attention_mask=mask, seed=2)
    e = weight[ids]
    assert torch.equal(out[1, 5:], e[1, 5:]) and torch.equal(out[2], e[2])
    xi = R.draw_noise("uniform", 24, 16, 2).view(3, 8, 16)
    for row, length in [(0, 8), (1, 5)]:
        mag = torch.tensor(R.noise_scale(5.0, length, 16))
        assert torch.equal(out[row, :length], e[row, :length] + xi[row, :length] * mag)
    assert torch.isfinite(out).all()
    # bool masks mean the same
    assert torch.equal(out, fastnoise.noisy_embedding(ids, weight, attention_mask=mask.bool(),
                                                      seed=2))


def test_symmetric_pair_shares_noise():
    ids, weight = _inputs(batch=2)
    pair = fastnoise.noisy_embedding(ids, weight, noise="bernoulli", symmetric=True, seed=3)
    assert pair.shape == (4, 11, 24)
    torch.testing.assert_close(pair[:2] + pair[2:], 2 * weight[ids], rtol=0, atol=1e-6)
    single = fastnoise.noisy_embedding(ids, weight, noise="bernoulli", seed=3)
    assert torch.equal(pair[:2], single)
    one_d = fastnoise.noisy_embedding(ids[0], weight, symmetric=True, seed=3)
    assert one_d.shape == (22, 24)


def test_seed_determinism_and_fresh_noise():
    ids, weight = _inputs()
    assert torch.equal(fastnoise.noisy_embedding(ids, weight, seed=11),
                       fastnoise.noisy_embedding(ids, weight, seed=11))
    a = fastnoise.noisy_embedding(ids, weight)
    b = fastnoise.noisy_embedding(ids, weight)
    assert not torch.equal(a, b)  # every call new noise
    torch.manual_seed(123)
    c = fastnoise.noisy_embedding(ids, weight)
    torch.manual_seed(123)
    assert torch.equal(c, fastnoise.noisy_embedding(ids, weight))  # manual_seed repeats


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradient_is_that_of_the_plain_embedding(symmetric):
    ids, weight = _inputs()
    w1 = weight.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    out = fastnoise.noisy_embedding(ids, w1, symmetric=symmetric, padding_idx=4, seed=1)
    grad = torch.randn_like(out)
    out.backward(grad)
    plain = F.embedding(ids, w2, padding_idx=4)
    if symmetric:
        plain = torch.cat([plain, plain])
    plain.backward(grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    assert torch.equal(w1.grad[4], torch.zeros(24))


def test_gradcheck_double():
    ids = torch.randint(0, 6, (2, 3))
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda w: fastnoise.noisy_embedding(ids, w, symmetric=True, seed=5,  # noqa: E731
                                             backend="reference")
    assert torch.autograd.gradcheck(fn, (weight,))


def test_empty_input():
    weight = torch.randn(10, 4)
    assert fastnoise.noisy_embedding(torch.zeros(0, dtype=torch.long), weight).shape == (0, 4)
    assert fastnoise.noisy_embedding(torch.zeros(2, 0, dtype=torch.long), weight).shape == (2, 0, 4)
    out = fastnoise.noisy_embedding(torch.zeros(0, 3, dtype=torch.long), weight, symmetric=True)
    assert out.shape == (0, 3, 4)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input=torch.tensor([[0, 10]])), IndexError, "out of range"),
    (dict(input=torch.tensor([[-1, 2]])), IndexError, "out of range"),
    (dict(input=torch.tensor([[0.0, 1.0]])), TypeError, "int32 or int64"),
    (dict(input=torch.tensor([[0, 1]], dtype=torch.int16)), TypeError, "int32 or int64"),
    (dict(attention_mask=torch.ones(1, 3)), ValueError, "shape"),
    (dict(attention_mask=torch.ones(1, 2)), TypeError, "bool or integer"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(alpha="5"), TypeError, "alpha"),
    (dict(noise="laplace"), ValueError, "noise kind"),
    (dict(backend="metal"), ValueError, "backend"),
    (dict(weight=torch.randn(10)), ValueError, "2-D"),
    (dict(weight=torch.randn(2, 10, 3)), ValueError, "2-D"),
    (dict(weight=torch.ones(10, 3, dtype=torch.long)), TypeError, "floating"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(padding_idx=10), ValueError, "padding_idx"),
])
def test_bad_inputs(kwargs, error, match):
    args = dict(input=torch.tensor([[0, 1]]), weight=torch.randn(10, 3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastnoise.noisy_embedding(args.pop("input"), args.pop("weight"), **args)


def test_unavailable_backend_says_what_is_missing():
    ids, weight = _inputs()
    for name in ("cuda",):
        with pytest.raises(fastnoise.BackendUnavailableError, match=name):
            fastnoise.noisy_embedding(ids, weight, backend=name)


def test_available_backends():
    names = fastnoise.available_backends("cpu")
    assert "reference" in names
    assert "cuda" not in names
    assert all(n in ("reference", "triton", "cuda", "cpu") for n in names)


def test_auto_resolves_each_op_on_its_own(monkeypatch):
    from fastnoise import backends
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu",
                        {"forward": ("cpu", "reference"), "backward": ("reference",),
                         "noisytune": ("reference",)})
    backends.clear_cache()
    try:
        assert backends.resolve_backend("auto", "cpu", torch.float32).name == "cpu"
        for op in ("backward", "noisytune"):
            assert backends.resolve_backend("auto", "cpu", torch.float32, op=op).name == "reference"
        assert fastnoise.available_backends("cpu", op="backward")[0] == "reference"
        # the forward on one backend, its gradient on another (a spy on the reference's)
        ref, calls = backends.get_backend("reference"), []

        class Spy:
            name = "spy"

            def unavailable_reason(self, device, dtype=None):
                return None

            def embedding_backward(self, *args, **kwargs):
                calls.append(args[0].shape)
                return ref.embedding_backward(*args, **kwargs)

        monkeypatch.setitem(backends._REGISTRY, "spy", Spy())
        backends.AUTO_ORDER["cpu"]["backward"] = ("spy",)
        backends.clear_cache()
        ids, weight = _inputs()
        w = weight.clone().requires_grad_()
        fastnoise.noisy_embedding(ids, w, seed=3).sum().backward()
        assert calls == [(ids.numel(), weight.shape[1])]
        assert torch.equal(w.grad, R.embedding_backward(torch.ones(ids.numel(), weight.shape[1]),
                                                        ids.reshape(-1), weight.shape[0]))
        with pytest.raises(ValueError, match="unknown op"):
            backends.resolve_backend("auto", "cpu", op="sideways")
    finally:
        backends.clear_cache()


def test_packed_sequences_use_each_segment_length():
    ids, weight = _inputs(batch=2, length=6, d=16)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    out = fastnoise.noisy_embedding(ids, weight, position_ids=pos, seed=4)
    xi = R.draw_noise("uniform", 12, 16, 4)
    lengths = torch.tensor([3, 3, 3, 2, 2, 1, 4, 4, 4, 4, 2, 2])
    for t in range(12):
        mag = torch.tensor(R.noise_scale(5.0, int(lengths[t]), 16))
        assert torch.equal(out.reshape(12, 16)[t], weight[ids.reshape(-1)[t]] + xi[t] * mag)
    cu = torch.tensor([0, 3, 5, 6, 10, 12], dtype=torch.int32)
    assert torch.equal(out, fastnoise.noisy_embedding(ids, weight, cu_seqlens=cu, seed=4))
    for bad in (torch.tensor([0, 3, 11]), torch.tensor([1, 12]), torch.tensor([0, 8, 5, 12])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            fastnoise.noisy_embedding(ids, weight, cu_seqlens=bad)
    with pytest.raises(ValueError, match="position_ids"):
        fastnoise.noisy_embedding(ids, weight, position_ids=pos[:, :3])


# --------------------------------------------------------------------------------------
# GPU only: seeds from the CUDA generator, CUDA graph capture
# --------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_seed_uses_counters_no_torch_kernel_uses():
    # torch's kernels read offset o as Philox counter o // 4 of each thread (curand): a call
    # that uses c counters starts at o // 4 and moves the generator 4 * c words on
    from fastnoise.seeds import draw_seed
    torch.cuda.manual_seed(123)
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.rand(1000, device="cuda")  # moves the offset
    before = gen.get_offset()
    seed, offset = draw_seed(torch.device("cuda"), 10)
    assert (seed, offset) == (123, before // 4)
    assert gen.get_offset() == before + 40
    assert draw_seed(torch.device("cuda"), 1)[1] == before // 4 + 10
    # the claim itself, against torch: element 0 of torch.rand is thread 0's first curand
    # word, i.e. word 0 of our counter o // 4 under the same key, as curand_uniform makes it
    o = gen.get_offset()
    x = torch.rand(1, device="cuda").item()
    w = int(R.noise_words(123, o // 4, 1, torch.device("cpu")).reshape(-1)[0]) % 2**32
    expect = (torch.tensor(float(w), dtype=torch.float32) * 2.0**-32 + 2.0**-33).item()
    assert x == expect


@pytest.mark.gpu
@needs_cuda
def test_packed_noise_can_be_captured_in_a_cuda_graph():
    import cuda_graphs
    weight = torch.randn(100, 64, device="cuda")
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    pos = torch.arange(16, device="cuda").remainder(5).expand(2, 16)  # segments of 5, 5, 5, 1
    cu = torch.tensor([0, 10, 32], dtype=torch.int32, device="cuda")
    for kw in (dict(position_ids=pos), dict(cu_seqlens=cu)):
        graph, out = cuda_graphs.capture(lambda: fastnoise.noisy_embedding(ids, weight, **kw))
        first, second = cuda_graphs.replay(graph, lambda: out.clone())
        assert not torch.equal(first, second) and torch.isfinite(first).all()


@pytest.mark.gpu
@needs_cuda
def test_noisytune_refuses_graph_capture():
    w = torch.randn(64, 64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with torch.cuda.graph(graph):
            fastnoise.noisytune_([w])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_first_call_inside_a_capture_is_refused_unless_settled(backend, monkeypatch):
    """A device's error buffer made inside a capture would be a graph allocation that never
    runs eagerly: the first call of a device inside a capture raises, while a module built
    (and so settled) outside the capture records into a buffer made outside it."""
    from fastnoise import errors, ops
    if backend not in fastnoise.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    monkeypatch.setattr(errors, "_STATES", {})
    monkeypatch.setattr(ops, "_SETTLED", {})
    w, ids = torch.randn(50, 32, device="cuda"), torch.randint(0, 50, (2, 8), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        with torch.cuda.graph(graph):
            fastnoise.noisy_embedding(ids, w, backend=backend)
    emb = fastnoise.NoisyEmbedding(50, 32, backend=backend).cuda()
    emb(ids)  # settled and warmed up outside the capture
    with torch.cuda.graph(graph):
        out = emb(ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    fastnoise.check_errors()


@pytest.mark.parametrize("symmetric", [False, True])
def test_training_false_is_the_plain_embedding(symmetric):
    """As F.dropout's ``training``: False returns exactly F.embedding (times embed_scale, in
    the weight's dtype), without noise and without the pair; True is the default."""
    weight = torch.randn(30, 8, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 30, (2, 5))
    out = fastnoise.noisy_embedding(ids, weight, symmetric=symmetric, training=False,
                                    padding_idx=3, embed_scale=2.7)
    assert torch.equal(out, F.embedding(ids, weight, 3) * torch.tensor(2.7).to(torch.bfloat16))
    out.float().sum().backward()
    assert weight.grad[3].abs().sum() == 0  # padding_idx as F.embedding
    noisy = fastnoise.noisy_embedding(ids, weight, symmetric=symmetric, seed=1)
    assert noisy.shape[0] == (4 if symmetric else 2)
    assert not torch.equal(noisy[:2], F.embedding(ids, weight))


def test_settled_call_is_reused_and_follows_the_weight():
    """Resolved once per (backend, device, dtype); a module whose weight changes dtype, or
    whose backend setting changes, settles again."""
    from fastnoise import ops
    emb = fastnoise.NoisyEmbedding(20, 8, backend="reference").train()
    ids = torch.randint(0, 20, (2, 3))
    emb(ids)
    first = emb.__dict__["_fastnoise_call"]
    emb(ids)
    assert emb.__dict__["_fastnoise_call"] is first
    assert ops.settle("reference", emb.weight.device, emb.weight.dtype) is first
    emb.double()
    assert emb(ids).dtype == torch.float64
    assert emb.__dict__["_fastnoise_call"].dtype == torch.float64
    emb.backend = "auto"
    emb(ids)
    assert emb.__dict__["_fastnoise_call"].requested == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_no_gpu_backend_is_listed_without_a_gpu():
    """available_backends("cuda") lists only what can run there, and says why not the rest."""
    from fastnoise.backends import get_backend
    assert fastnoise.available_backends("cuda") == ["reference"]
    for name in ("triton", "cuda"):
        reason = get_backend(name).unavailable_reason(torch.device("cuda"))
        assert reason is not None and any(
            why in reason for why in ("CUDA device", "extension", "interpreter is on"))
