"""The user-facing ops called directly (they are public entry points): the C++ op for the
compiled backends ("cpu", "cuda"), the Python op with a backend name for the others; and
random packing inputs for them."""

import torch

NATIVE = ("cpu", "cuda")


def forward_op(backend, weight, ids, *, attention_mask=None, position_ids=None, cu_seqlens=None,
               noise=0, alpha=1.0, seed=5, offset=0, draw_seed=False, symmetric=False,
               padding_idx=-1, embed_scale=1.0):
    """(op, args) of one forward call."""
    args = (weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha, seed, offset,
            draw_seed, symmetric, padding_idx, embed_scale)
    if backend in NATIVE:
        return torch.ops.fastnoise.noisy_embedding.default, args
    return torch.ops.fastnoise.noisy_embedding_python.default, args + (backend,)


def backward_op(backend, grad_out, ids, num_weights, *, padding_idx=-1, symmetric=False,
                embed_scale=1.0):
    """(op, args) of one gradient call."""
    args = (grad_out, ids, num_weights, padding_idx, symmetric, embed_scale)
    if backend in NATIVE:
        return torch.ops.fastnoise.noisy_embedding_backward.default, args
    return torch.ops.fastnoise.noisy_embedding_backward_python.default, args + (backend,)


def call_forward(backend, weight, ids, **kwargs):
    op, args = forward_op(backend, weight, ids, **kwargs)
    return op(*args)


def call_backward(backend, grad_out, ids, num_weights, **kwargs):
    op, args = backward_op(backend, grad_out, ids, num_weights, **kwargs)
    return op(*args)


def packing_case(kind, batch, length, dtype=torch.long):
    """(mask, positions, cu_seqlens) of a random packing of this kind: a fully masked row,
    sequences restarting at random places, empty cu_seqlens sequences."""
    n = batch * length
    mask = positions = cu = None
    if "mask" in kind:
        mask = (torch.rand(batch, length) > 0.3).to(dtype)
        mask[0] = 0
    if "positions" in kind:
        starts = torch.rand(batch, length) < 0.15
        starts[:, 0] = True
        idx = torch.arange(length).repeat(batch, 1)
        positions = (idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values).to(
            dtype if dtype != torch.bool else torch.long)
    if "cu" in kind:
        cuts = torch.sort(torch.randint(0, n + 1, (5,))).values
        cu = torch.cat([torch.tensor([0]), cuts, cuts[2:3], torch.tensor([n])]).sort().values
        cu = cu.to(torch.int32)
    return mask, positions, cu
