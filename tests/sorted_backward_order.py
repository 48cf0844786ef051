"""The summation order of the sorted (deterministic) backward of both GPU backends, spelled out
in torch: what their bits must be.

The ids are sorted stably (token order within an id) and the sorted positions cut into chunks
of 32. A run of equal ids of at most 32 tokens is summed serially in token order from zero
(the reference's index_add_ order: its bits). A longer run is cut at the chunk boundaries:
each piece is summed serially from zero, then the pieces are added in chunk order, from zero.
Each term is the float32 (float64 for float64 grads) row, its pair's row added first, then
times embed_scale (contract C3, as fastnoise.reference.embedding_backward).
"""

import torch

CHUNK = 32


def _serial(rows, acc_dtype):
    acc = torch.zeros(rows.shape[1], dtype=acc_dtype)
    for r in rows:
        acc = acc + r
    return acc


def sorted_backward_sums(grad_out, ids, num_weights, *, padding_idx=None, symmetric=False,
                         embed_scale=1.0):
    """The sorted backward's gradient, bit for bit, in grad_out's dtype (CPU tensors).
    Out-of-range ids and padding_idx contribute nothing."""
    n = ids.numel()
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(acc_dtype)
    if symmetric:
        g = g[:n] + g[n:]
    if embed_scale != 1.0:
        g = g * torch.tensor(embed_scale, dtype=acc_dtype)
    sorted_ids, perm = torch.sort(ids.reshape(-1).long(), stable=True)
    out = torch.zeros(num_weights, g.shape[1], dtype=acc_dtype)
    pad = None if padding_idx is None else padding_idx % num_weights
    values, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    start = 0
    for v, count in zip(values.tolist(), counts.tolist()):
        s, e = start, start + count  # positions [s, e)
        start = e
        if v < 0 or v >= num_weights or v == pad:
            continue
        rows = g[perm[s:e]]
        if count <= CHUNK:
            out[v] = _serial(rows, acc_dtype)
            continue
        cuts = [s] + list(range((s // CHUNK + 1) * CHUNK, e, CHUNK)) + [e]
        acc = torch.zeros(g.shape[1], dtype=acc_dtype)
        for a, b in zip(cuts[:-1], cuts[1:]):
            acc = acc + _serial(g[perm[a:b]], acc_dtype)
        out[v] = acc
    return out.to(grad_out.dtype)
