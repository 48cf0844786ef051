"""The ops under torch.library.opcheck and torch.compile(fullgraph=True) on the CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnoise
from fastnoise import ops, reference as R

import cuda_graphs
from op_args import backward_op, call_forward, forward_op

BACKENDS = [b for b in fastnoise.available_backends("cpu") if b in ("reference", "cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_noisy_embedding(backend, symmetric):
    """Schema, fake tensors, autograd registration (forward and the gradient op) of the op a
    backend runs, with every input kind."""
    weight = torch.randn(30, 12, requires_grad=True)
    ids = torch.randint(0, 30, (3, 6))
    mask = (torch.rand(3, 6) > 0.3).long()
    pos = torch.arange(6).repeat(3, 1) % 4
    cu = torch.tensor([0, 5, 5, 18], dtype=torch.int32)
    for kwargs in [dict(seed=ops.as_int64(2**63 + 7), offset=5, padding_idx=3),
                   dict(noise=2, alpha=0.0, attention_mask=mask),
                   dict(noise=1, position_ids=pos, embed_scale=2.5),
                   dict(cu_seqlens=cu, attention_mask=mask, draw_seed=True, seed=0)]:
        op, args = forward_op(backend, weight, ids, symmetric=symmetric, **kwargs)
        # a drawn seed differs per call: only the schema and the fake tensors are comparable
        utils = (("test_schema", "test_faketensor") if kwargs.get("draw_seed") else
                 ("test_schema", "test_autograd_registration", "test_faketensor",
                  "test_aot_dispatch_dynamic"))
        torch.library.opcheck(op, args, test_utils=utils)
    grad = torch.randn(6 if symmetric else 3, 6, 12)
    op, args = backward_op(backend, grad, ids, 30, padding_idx=3, symmetric=symmetric,
                           embed_scale=1.5)
    torch.library.opcheck(op, args)


def test_ops_are_tagged_nondeterministic_seeded():
    """No compiler pass may deduplicate two noisy calls or recompute one with the same noise."""
    tag = torch.Tag.nondeterministic_seeded
    assert tag in torch.ops.fastnoise.noisy_embedding.default.tags
    assert tag in torch.ops.fastnoise.noisy_embedding_python.default.tags


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_noisytune(backend):
    tensors = [torch.randn(5, 7), torch.randn(33)]
    torch.library.opcheck(torch.ops.fastnoise.apply_noisytune_.default,
                          (tensors, 0.15, 3, [0, 9], backend),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_matches_reference_with_a_uint64_seed(backend):
    weight, ids = torch.randn(20, 9), torch.randint(0, 20, (6,))
    out = call_forward(backend, weight, ids, alpha=0.5, seed=ops.as_int64(2**64 - 3),
                       offset=ops.as_int64(2**63))
    expect = R.noisy_embedding(ids, weight, noise="uniform", mag=R.noise_scale(0.5, 6, 9),
                               seed=2**64 - 3, offset=2**63)
    assert torch.equal(out, expect)


class _Tiny(nn.Module):
    def __init__(self, symmetric=False):
        super().__init__()
        self.emb = fastnoise.NoisyEmbedding(50, 16, padding_idx=0, noise="uniform", alpha=5.0,
                                            symmetric=symmetric)
        self.head = nn.Linear(16, 50)

    def forward(self, ids, mask=None):
        return self.head(self.emb(ids, attention_mask=mask))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_trains_with_fresh_noise(compiler):
    torch.manual_seed(0)
    model = _Tiny().train()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    ids = torch.randint(0, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[2, 5:] = 0
    out = compiled(ids, mask)
    out.sum().backward()
    grad_compiled = model.emb.weight.grad.clone()
    model.zero_grad()
    model(ids, mask).sum().backward()  # eager: the noise is a constant, grads agree
    torch.testing.assert_close(grad_compiled, model.emb.weight.grad)
    a, b = compiled(ids, mask), compiled(ids, mask)
    assert not torch.equal(a, b)  # every call draws new noise, also compiled
    torch.manual_seed(5)
    c = compiled(ids, mask)
    torch.manual_seed(5)
    assert torch.equal(c, compiled(ids, mask))
    model.eval()
    assert torch.equal(compiled(ids, mask), model.head(F.embedding(ids, model.emb.weight)))


def test_compile_fullgraph_symmetric_pair():
    torch.manual_seed(0)
    model = _Tiny(symmetric=True).train()
    compiled = torch.compile(model.emb, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 50, (2, 7))
    pair = compiled(ids)
    assert pair.shape == (4, 7, 16)
    torch.testing.assert_close(pair[:2] + pair[2:], 2 * F.embedding(ids, model.emb.weight),
                               rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_draw_new_noise_matching_the_reference():
    torch.manual_seed(0)
    weight = torch.randn(1000, 256, device="cuda")
    ids = torch.randint(0, 1000, (4, 64), device="cuda")
    fastnoise.noisy_embedding(ids, weight)  # warm up (compile kernels) outside the capture
    graph, out = cuda_graphs.capture(lambda: fastnoise.noisy_embedding(ids, weight))
    seen = cuda_graphs.replay(graph, lambda: (int(ops.LAST_CAPTURED_SEED[0].item()) % 2**64,
                                              out.clone()))
    for seed, got in seen:
        expect = R.noisy_embedding(ids.reshape(-1).cpu(), weight.cpu(), noise="uniform",
                                   mag=R.noise_scale(5.0, 64, 256), seed=seed)
        assert torch.equal(got.reshape(-1, 256).cpu(), expect)
    assert seen[0][0] != seen[1][0] and not torch.equal(seen[0][1], seen[1][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_reduce_overhead_changes_noise_per_call():
    torch.manual_seed(0)
    model = _Tiny().cuda().train()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, 50, (3, 8), device="cuda")
    outs = [compiled(ids).clone() for _ in range(4)]
    assert not torch.equal(outs[2], outs[3])


class _Packed(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.emb = fastnoise.NoisyEmbedding(50, 16, padding_idx=0, **kwargs)
        self.head = nn.Linear(16, 50)

    def forward(self, ids, mask=None, position_ids=None):
        return self.head(self.emb(ids, attention_mask=mask, position_ids=position_ids))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("inputs", ["ids", "mask", "position_ids"])
@pytest.mark.parametrize("method", ["neftune", "symnoise"])
def test_compile_with_varying_lengths_has_no_graph_break(compiler, inputs, method):
    """Dynamic shapes: the scale comes from a symbolic length; one graph, no break, and
    each length gets the eager result's gradient and, in the compiled call itself, the
    reference's noise with its own scale."""
    torch._dynamo.reset()
    noise, symmetric = fastnoise.METHODS[method]
    model = _Packed(noise=noise, symmetric=symmetric).train()
    compiled = torch.compile(model, fullgraph=True, backend=compiler, dynamic=True)
    compiled_emb = torch.compile(model.emb, fullgraph=True, backend=compiler, dynamic=True)
    for length in (5, 7, 12):
        ids = torch.randint(1, 50, (2, length))
        kwargs = {}
        if inputs == "mask":
            kwargs["mask"] = torch.ones(2, length, dtype=torch.long)
            kwargs["mask"][0, -2:] = 0
        elif inputs == "position_ids":
            pos = torch.arange(length).repeat(2, 1)
            pos[1, 3:] -= 3
            kwargs["position_ids"] = pos
        out = compiled(ids, **kwargs)
        out.sum().backward()
        grad = model.emb.weight.grad.clone()
        model.zero_grad()
        model(ids, **kwargs).sum().backward()
        torch.testing.assert_close(grad, model.emb.weight.grad)
        model.zero_grad()
        # the compiled call's own noise: the reference's, with this length's scale(s)
        emb_kwargs = {"attention_mask" if k == "mask" else k: v for k, v in kwargs.items()}
        torch.manual_seed(length)
        got = compiled_emb(ids, **emb_kwargs)
        torch.manual_seed(length)
        seed = int(torch.randint(0, 2**63 - 1, ()))  # the draw the op makes (contract C4)
        tok_mag = None if not kwargs else R.token_scale(
            5.0, 16, ids.numel(), length, attention_mask=kwargs.get("mask"),
            position_ids=kwargs.get("position_ids"))
        want = R.noisy_embedding(ids, model.emb.weight.detach(), noise=noise,
                                 mag=R.noise_scale(5.0, length, 16), tok_mag=tok_mag, seed=seed,
                                 symmetric=symmetric)
        got = got.detach().reshape(want.shape)
        if noise == "gaussian":
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        else:
            assert torch.equal(got, want)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("inputs", ["ids", "mask", "position_ids"])
def test_varying_lengths_add_no_recompile(inputs):
    """dynamic=True: the noisy embedding compiles as often as a plain one over 6 lengths
    (the scale of a mask or packed rows is computed inside the op)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def frames(emb):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(emb, backend=counter, dynamic=True, fullgraph=True)
        for length in (5, 7, 12, 16, 21, 33):
            ids = torch.randint(1, 50, (2, length))
            kwargs = {}
            if inputs == "mask":
                kwargs["attention_mask"] = (torch.rand(2, length) > 0.2).long()
            elif inputs == "position_ids":
                kwargs["position_ids"] = torch.arange(length).repeat(2, 1) % 4
            if isinstance(emb, fastnoise.NoisyEmbedding):
                compiled(ids, **kwargs)
            else:
                compiled(ids)
        return counter.frame_count

    noisy = fastnoise.NoisyEmbedding(50, 16).train()
    plain = nn.Embedding(50, 16).train()
    assert frames(noisy) == frames(plain)


@pytest.mark.parametrize("backend", [b for b in fastnoise.available_backends("cpu")
                                     if b != "reference"])
@pytest.mark.parametrize("bad", ["cu_seqlens", "position_ids"])
def test_invalid_packing_is_reported_under_compile(backend, bad):
    """The op records invalid packing inputs itself, so a compiled call reports them too (the
    Python frontend is traced away)."""
    torch._dynamo.reset()
    emb = fastnoise.NoisyEmbedding(20, 8, backend=backend).train()
    ids = torch.randint(0, 20, (2, 6))
    kwargs = ({"cu_seqlens": torch.tensor([0, 7, 5, 12])} if bad == "cu_seqlens" else
              {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, -1, 0, 1, 2]])})
    compiled = torch.compile(emb, backend="aot_eager", fullgraph=True)
    with pytest.raises((fastnoise.BadPackingError, ValueError), match=bad):
        out = compiled(ids, **kwargs)
        assert out.isnan().all()  # on the CPU the op may only record: then check_errors raises
        fastnoise.check_errors()
    fastnoise.check_errors()  # reported once
