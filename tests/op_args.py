"""The user-facing ops called directly (they are public entry points): the C++ op for the
compiled backends ("cpu", "cuda"), the Python op with a backend name for the others."""

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
