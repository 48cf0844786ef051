"""The per-token scale of a mask or packed rows, computed inside each backend's op (the C++ op's
loop, the Triton kernels, the CUDA kernels in tests/test_cuda_emulated.py), against
``reference.token_scale``: bit for bit, for every packing kind, rows longer than a block,
every integer dtype of the inputs, and invalid packing (NaN, recorded, raised)."""

import pytest
import torch

import fastnoise
from fastnoise import reference as R

from op_args import packing_case

BACKENDS = [b for b in fastnoise.available_backends("cpu", torch.float32) if b != "reference"]
KINDS = ["mask", "positions", "mask+positions", "cu", "mask+cu"]
SHAPES = [(1, 1), (3, 7), (2, 600), (1, 1100), (70, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_the_op_uses_the_reference_scale(backend, kind, shape):
    batch, length = shape
    mask, positions, cu = packing_case(kind, batch, length)
    weight = torch.randn(50, 24)
    ids = torch.randint(0, 50, shape)
    out = fastnoise.noisy_embedding(ids, weight, alpha=3.5, seed=11, attention_mask=mask,
                                    position_ids=positions, cu_seqlens=cu, backend=backend)
    tok_mag = R.token_scale(3.5, 24, ids.numel(), length, attention_mask=mask,
                            position_ids=positions, cu_seqlens=cu)
    want = R.noisy_embedding(ids.reshape(-1), weight, noise="uniform", tok_mag=tok_mag, seed=11)
    assert torch.equal(out.reshape(want.shape), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16,
                                   torch.int32, torch.int64], ids=str)
def test_every_integer_dtype_of_the_inputs(backend, dtype):
    mask, positions, _ = packing_case("mask+positions", 3, 40, dtype)
    weight, ids = torch.randn(30, 16), torch.randint(0, 30, (3, 40))
    out = fastnoise.noisy_embedding(ids, weight, alpha=2.0, seed=3, attention_mask=mask,
                                    position_ids=positions, backend=backend)
    tok_mag = R.token_scale(2.0, 16, 120, 40, attention_mask=mask, position_ids=positions)
    want = R.noisy_embedding(ids.reshape(-1), weight, noise="uniform", tok_mag=tok_mag, seed=3)
    assert torch.equal(out.reshape(want.shape), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["negative position", "cu not from 0", "cu short", "cu down"])
def test_invalid_packing_raises_after_a_nan_scale(backend, bad):
    batch, length = 3, 300
    n = batch * length
    positions = cu = None
    if bad == "negative position":
        positions = torch.arange(length).repeat(batch, 1)
        positions[2, 250] = -1  # one entry, in the last row, past the first block
    else:
        cu = torch.tensor({"cu not from 0": [2, 400, n], "cu short": [0, 400, n - 1],
                           "cu down": [0, 500, 400, n]}[bad])
    weight, ids = torch.randn(9, 8), torch.randint(0, 9, (batch, length))
    with pytest.raises(fastnoise.BadPackingError,
                       match="position_ids" if positions is not None else "cu_seqlens"):
        fastnoise.noisy_embedding(ids, weight, position_ids=positions, cu_seqlens=cu,
                                  backend=backend)
    fastnoise.noisy_embedding(ids, weight, backend=backend)  # reported once


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available here")
@pytest.mark.parametrize("bad", ["negative position", "cu down"])
def test_triton_kernel_writes_nan_and_records(bad):
    from fastnoise.triton_ops import token_scale as TS

    positions = cu = None
    if bad == "negative position":
        positions = torch.arange(300).repeat(3, 1)
        positions[2, 250] = -1
        code = 3
    else:
        cu = torch.tensor([0, 500, 400, 900])
        code = 2
    error = torch.zeros(4, dtype=torch.int64)
    mag = TS.token_scale(1.0, 32, 900, 300, None, positions, cu, error)
    assert mag.isnan().all()
    assert error.tolist() == [code, 0, 900, 0]
