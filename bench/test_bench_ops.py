"""pytest-benchmark versions of the ``python -m fastnoise bench`` workloads.

Run with ``pytest bench/ --benchmark-only`` (not collected by ``pytest tests``). On a GPU the
shapes are the LLM ones of the Triton issue; on a CPU small ones. These time, they never assert
on time.
"""

import pytest
import torch
import torch.nn.functional as F

import fastnoise
from fastnoise import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = bench.QUICK_GPU_SHAPES if DEVICE.type == "cuda" else bench.QUICK_CPU_SHAPES
BACKENDS = bench.fast_backends(DEVICE, DTYPE)


def _sync(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(params=SHAPES, ids=lambda s: "B{}-L{}-d{}-V{}".format(*s))
def inputs(request):
    batch, length, d, vocab = request.param
    return (torch.randint(0, vocab, (batch, length), device=DEVICE),
            torch.randn(vocab, d, device=DEVICE, dtype=DTYPE))


def test_plain_embedding(benchmark, inputs):
    ids, weight = inputs
    benchmark(_sync(lambda: F.embedding(ids, weight)))


def test_hf_neftune_hook(benchmark, inputs):
    ids, weight = inputs
    benchmark(_sync(lambda: bench.hf_neftune_hook(ids, weight, 5.0)))


def test_torch_symnoise_pair(benchmark, inputs):
    ids, weight = inputs
    benchmark(_sync(lambda: bench.torch_symnoise_pair(ids, weight, 5.0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise,symmetric", [("uniform", False), ("gaussian", False),
                                             ("bernoulli", False), ("bernoulli", True)])
def test_fastnoise_forward(benchmark, inputs, backend, noise, symmetric):
    ids, weight = inputs
    benchmark(_sync(lambda: fastnoise.noisy_embedding(ids, weight, noise=noise,
                                                      symmetric=symmetric, backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fastnoise_forward_backward(benchmark, inputs, backend):
    ids, weight = inputs
    weight = weight.clone().requires_grad_()
    grad = torch.randn(*ids.shape, weight.shape[1], device=DEVICE, dtype=DTYPE)

    def step():
        weight.grad = None
        fastnoise.noisy_embedding(ids, weight, backend=backend).backward(grad)

    benchmark(_sync(step))


@pytest.fixture
def params():
    return [torch.randn(s, device=DEVICE, dtype=DTYPE) for s in bench.llama_like_shapes(DEVICE)]


def test_noisytune_snippet(benchmark, params):
    benchmark(_sync(lambda: bench.noisytune_snippet(params)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fastnoise_noisytune(benchmark, params, backend):
    benchmark(_sync(lambda: fastnoise.noisytune_(params, 0.15, backend=backend)))
