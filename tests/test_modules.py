"""NoisyEmbedding and noisytune_ on the public API."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnoise
from fastnoise import reference as R


def test_eval_mode_is_exactly_nn_embedding():
    emb = fastnoise.NoisyEmbedding(40, 12, padding_idx=0)
    ids = torch.randint(0, 40, (3, 9))
    emb.eval()
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight, 0))
    emb.train()
    assert not torch.equal(emb(ids), F.embedding(ids, emb.weight, 0))


def test_module_is_an_embedding_and_initialised_like_one():
    emb = fastnoise.NoisyEmbedding(40, 12, padding_idx=3, noise="gaussian", alpha=10)
    assert isinstance(emb, nn.Embedding)
    assert torch.equal(emb.weight[3], torch.zeros(12))
    assert "noise='gaussian'" in repr(emb) and "alpha=10.0" in repr(emb)


def test_from_embedding_shares_the_parameter_and_ties():
    base = nn.Embedding(30, 8, padding_idx=2)
    head = nn.Linear(8, 30, bias=False)
    head.weight = base.weight  # tied output embedding
    emb = fastnoise.NoisyEmbedding.from_embedding(base, method="symnoise", alpha=3.0)
    assert emb.weight is base.weight is head.weight
    assert emb.padding_idx == 2 and emb.noise == "bernoulli" and emb.symmetric
    ids = torch.randint(0, 30, (2, 5))
    out = emb(ids)
    assert out.shape == (4, 5, 8)
    out.sum().backward()
    assert torch.equal(base.weight.grad[2], torch.zeros(8))  # padding_idx: no gradient
    with pytest.raises(ValueError, match="max_norm"):
        fastnoise.NoisyEmbedding.from_embedding(nn.Embedding(5, 2, max_norm=1.0))
    with pytest.raises(ValueError, match="method"):
        fastnoise.NoisyEmbedding.from_embedding(base, method="dropout")


def test_module_attention_mask_argument():
    emb = fastnoise.NoisyEmbedding(30, 8)
    ids = torch.randint(0, 30, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    out = emb(ids, attention_mask=mask)
    assert torch.equal(out[0, 4:], emb.weight[ids[0, 4:]])


def test_module_gradients_match_plain_embedding():
    emb = fastnoise.NoisyEmbedding(30, 8)
    ref = nn.Embedding(30, 8)
    ref.weight.data.copy_(emb.weight.data)
    ids = torch.randint(0, 30, (4, 7))
    emb(ids).pow(2).sum().backward()  # the noise is a constant: grads differ only by it
    F.embedding(ids, ref.weight).sum().backward()
    emb.zero_grad()
    emb(ids).sum().backward()
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad)


def _small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.LayerNorm(16),
                          nn.Linear(16, 20, bias=False))
    return model


def test_noisytune_on_a_module_matches_the_reference():
    model = _small_model()
    params = [p for _, p in model.named_parameters()]
    expect = [p.detach().clone() for p in params]
    R.noisytune_(expect, 0.15, seed=8)
    before = [p.detach().clone() for p in params]
    fastnoise.noisytune_(model, 0.15, seed=8)
    for p, e, b in zip(params, expect, before):
        assert torch.equal(p, e)
    layernorm_weight = model[2].weight  # all ones: std 0, unchanged (the snippet gives NaN)
    assert torch.equal(layernorm_weight, torch.ones(16))
    assert torch.equal(model[2].bias, torch.zeros(16))
    moved = [not torch.equal(p, b) for p, b in zip(params, before)]
    assert moved == [True, True, True, False, False, True]
    assert all(p.is_leaf and p.requires_grad for p in params)


def test_noisytune_perturbation_size():
    w = torch.randn(200, 300) * 2 + 7
    w0 = w.clone()
    fastnoise.noisytune_([w], 0.15, seed=1)
    delta = (w - w0) / (0.15 * w0.std())
    assert delta.min() >= -0.5 - 1e-4 and delta.max() < 0.5 + 1e-4  # fp32 rounding of w - w0
    assert abs(float(delta.mean())) < 0.01
    assert abs(float(delta.var()) - 1 / 12) < 0.005


def test_noisytune_tied_parameters_once_and_no_grad():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    w0 = emb.weight.detach().clone()
    fastnoise.noisytune_(model, 0.15, seed=3)
    expect = w0.clone()
    R.noisytune_([expect], 0.15, seed=3)
    assert torch.equal(emb.weight, expect)  # perturbed once, not twice


def test_noisytune_small_and_constant_tensors_unchanged():
    a, b, c = torch.tensor([3.0]), torch.full((5,), 2.0), torch.empty(0)
    fastnoise.noisytune_([a, b, c], seed=1)
    assert a.item() == 3.0 and torch.equal(b, torch.full((5,), 2.0))


def test_noisytune_repeatable_with_manual_seed_and_noncontiguous():
    w = torch.randn(6, 8)
    x, y = w.clone(), w.clone()
    torch.manual_seed(5)
    fastnoise.noisytune_([x])
    torch.manual_seed(5)
    fastnoise.noisytune_([y])
    assert torch.equal(x, y) and not torch.equal(x, w)
    t = torch.randn(8, 6).T  # non-contiguous
    expect = t.contiguous().clone()
    R.noisytune_([expect], 0.15, seed=2)
    fastnoise.noisytune_([t], seed=2)
    assert torch.equal(t, expect)


@pytest.mark.parametrize("lam,error", [(-0.1, ValueError), (float("nan"), ValueError),
                                       (float("inf"), ValueError), (None, TypeError)])
def test_noisytune_bad_lambda(lam, error):
    with pytest.raises(error, match="lam"):
        fastnoise.noisytune_([torch.randn(4)], lam)


def test_noisytune_bad_tensors():
    with pytest.raises(TypeError):
        fastnoise.noisytune_([torch.arange(5)], seed=1)
    with pytest.raises(TypeError):
        fastnoise.noisytune_(42)


def test_from_embedding_reads_no_weight_shape():
    """A ZeRO-3 placeholder (shape (0,)) at wrap time: sizes come from the module."""
    base = nn.Embedding(30, 8, padding_idx=1)
    placeholder = nn.Parameter(torch.empty(0))
    base.weight = placeholder
    emb = fastnoise.NoisyEmbedding.from_embedding(base, method="neftune")
    assert emb.weight is placeholder
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (30, 8, 1)


def test_no_noise_without_autograd():
    """Training mode under no_grad (a DPO reference pass) is the plain embedding."""
    emb = fastnoise.NoisyEmbedding(40, 12).train()
    ids = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
    with torch.inference_mode():
        assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
    assert not torch.equal(emb(ids), F.embedding(ids, emb.weight))
