"""The public ops as ``torch.library`` custom ops: opaque to torch.compile (no graph break),
with fake implementations and registered autograd.

* ``torch.ops.fastnoise.noisy_embedding`` -> (N, d) or (2N, d); its gradient is
  ``torch.ops.fastnoise.noisy_embedding_backward``.
* ``torch.ops.fastnoise.apply_noisytune_`` perturbs a list of tensors in place.

The op bodies run eagerly, also inside a compiled graph: they check the ids (one device
sync), pick the backend and, when asked to, draw a fresh seed from torch's default generator,
so every call of a compiled model gets new noise. Seeds and counter offsets are uint64 carried
as int64 bit patterns (the schema's ``int``).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import reference
from .backends import resolve_backend
from .seeds import draw_seed as draw, rank_seed_mask

_U64 = 1 << 64


def as_int64(value: int) -> int:
    """uint64 -> the int64 with the same bits."""
    value = int(value) % _U64
    return value - _U64 if value >= 1 << 63 else value


def as_uint64(value: int) -> int:
    return int(value) % _U64


#: the device seed tensor of the last noisy embedding captured into a CUDA graph (its value
#: after a replay is the seed that replay used; tests and debugging read it)
LAST_CAPTURED_SEED: List[Optional[torch.Tensor]] = [None]


def capturing(t: torch.Tensor) -> bool:
    """True while ``t``'s CUDA stream is being captured into a graph (no host sync allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_id_range(ids: torch.Tensor, num_embeddings: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = torch.stack([lo, hi]).tolist()  # one device sync, before any kernel runs
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise IndexError(f"token id {bad} is out of range [0, {num_embeddings})")


def _forward(weight, ids, tok_mag, noise, mag, seed, offset, draw_seed, symmetric, backend,
             embed_scale):
    """The forward: shared by the custom op (compiled graphs) and the eager autograd path."""

    chosen = resolve_backend(backend, weight.device, weight.dtype)
    extra = {}
    if capturing(weight):
        # Inside a CUDA graph: no host sync is possible (the id check is skipped; kernels
        # write NaN rows for bad ids), and a host-drawn seed would be frozen into the graph.
        # Draw the seed on the device instead: PyTorch's RNG advances on every replay.
        if draw_seed:
            seed_tensor = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=weight.device)
            mask = rank_seed_mask()
            if mask:  # rank-distinct, as draw_seed does on the host
                seed_tensor = seed_tensor ^ as_int64(mask)
            extra["seed_tensor"] = seed_tensor
            LAST_CAPTURED_SEED[0] = seed_tensor  # graph memory: holds each replay's seed
            seed, offset = 0, 0
    else:
        check_id_range(ids, weight.shape[0])
        if draw_seed:
            seed, offset = draw(weight.device,
                                reference.counters_used(noise, ids.numel(), weight.shape[1]),
                                rank_distinct=True)
    out = torch.empty(ids.numel() * (2 if symmetric else 1), weight.shape[1],
                      dtype=weight.dtype, device=weight.device)
    if ids.numel():
        chosen.embedding_forward(ids, weight, out, noise=noise, mag=mag, tok_mag=tok_mag,
                                 seed=as_uint64(seed), offset=as_uint64(offset),
                                 symmetric=symmetric, embed_scale=embed_scale, **extra)
    return out


def _backward(grad_out, ids, num_weights, padding_idx, symmetric, backend, embed_scale):
    chosen = resolve_backend(backend, grad_out.device, grad_out.dtype, op="backward")
    return chosen.embedding_backward(
        grad_out.contiguous(), ids, num_weights,
        padding_idx=None if padding_idx < 0 else padding_idx, symmetric=symmetric,
        deterministic=torch.are_deterministic_algorithms_enabled(), embed_scale=embed_scale)


@torch.library.custom_op("fastnoise::noisy_embedding", mutates_args=())
def noisy_embedding(weight: torch.Tensor, ids: torch.Tensor, tok_mag: Optional[torch.Tensor],
                    noise: str, mag: float, seed: int, offset: int, draw_seed: bool,
                    symmetric: bool, padding_idx: int, backend: str,
                    embed_scale: float = 1.0) -> torch.Tensor:
    """Fused noisy embedding of the flat ``ids``; ``padding_idx`` < 0 means none (it only
    matters for the gradient). With ``draw_seed`` the seed/offset arguments are ignored and
    drawn from the device's default generator (rank-distinct under torch.distributed).
    ``embed_scale`` (already rounded to the weight's dtype) scales the rows first (Gemma)."""
    return _forward(weight, ids, tok_mag, noise, mag, seed, offset, draw_seed, symmetric,
                    backend, embed_scale)


@noisy_embedding.register_fake
def _(weight, ids, tok_mag, noise, mag, seed, offset, draw_seed, symmetric, padding_idx,
      backend, embed_scale=1.0):
    return weight.new_empty(ids.numel() * (2 if symmetric else 1), weight.shape[1])


@torch.library.custom_op("fastnoise::noisy_embedding_backward", mutates_args=())
def noisy_embedding_backward(grad_out: torch.Tensor, ids: torch.Tensor, num_weights: int,
                             padding_idx: int, symmetric: bool, backend: str,
                             embed_scale: float = 1.0) -> torch.Tensor:
    """Gradient of the weight: that of the (scaled) plain embedding, the halves of a pair
    summed."""
    return _backward(grad_out, ids, num_weights, padding_idx, symmetric, backend, embed_scale)


@noisy_embedding_backward.register_fake
def _(grad_out, ids, num_weights, padding_idx, symmetric, backend, embed_scale=1.0):
    return grad_out.new_empty(num_weights, grad_out.shape[-1])


def _setup_context(ctx, inputs, output):
    weight, ids = inputs[0], inputs[1]
    ctx.save_for_backward(ids)
    ctx.num_weights = weight.shape[0]
    ctx.symmetric, ctx.padding_idx, ctx.backend = inputs[8], inputs[9], inputs[10]
    ctx.embed_scale = inputs[11] if len(inputs) > 11 else 1.0


def _op_backward(ctx, grad_out):
    grad_weight = None
    if ctx.needs_input_grad[0]:
        (ids,) = ctx.saved_tensors
        grad_weight = noisy_embedding_backward(grad_out, ids, ctx.num_weights, ctx.padding_idx,
                                               ctx.symmetric, ctx.backend, ctx.embed_scale)
    return (grad_weight,) + (None,) * 11


noisy_embedding.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerNoisyEmbedding(torch.autograd.Function):
    """The same op without the custom-op dispatch (tens of microseconds per call): what
    eager calls use; compiled graphs use the custom op. The non-tensor arguments travel as
    one tuple: apply() pays per argument."""

    @staticmethod
    def forward(ctx, weight, ids, tok_mag, config):
        noise, mag, seed, offset, draw_seed, symmetric, padding_idx, backend, scale = config
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]
        ctx.config = (padding_idx, symmetric, backend, scale)
        return _forward(weight, ids, tok_mag, noise, mag, seed, offset, draw_seed, symmetric,
                        backend, scale)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        padding_idx, symmetric, backend, scale = ctx.config
        return (_backward(grad_out, ids, ctx.num_weights, padding_idx, symmetric, backend,
                          scale), None, None, None)


def call_noisy_embedding(weight, ids, tok_mag, noise, mag, seed, offset, draw_seed, symmetric,
                         padding_idx, backend, embed_scale):
    """Run the op: the custom op while torch.compile traces; in eager mode the lean
    autograd path, or no autograd at all when no gradient is wanted."""
    if torch.compiler.is_compiling():
        return noisy_embedding(weight, ids, tok_mag, noise, mag, seed, offset, draw_seed,
                               symmetric, padding_idx, backend, embed_scale)
    if weight.requires_grad and torch.is_grad_enabled():
        return _EagerNoisyEmbedding.apply(weight, ids, tok_mag, (
            noise, mag, seed, offset, draw_seed, symmetric, padding_idx, backend, embed_scale))
    return _forward(weight, ids, tok_mag, noise, mag, seed, offset, draw_seed, symmetric,
                    backend, embed_scale)


@torch.library.custom_op("fastnoise::apply_noisytune_", mutates_args=("tensors",))
def apply_noisytune_(tensors: List[torch.Tensor], lam: float, seed: int, starts: List[int],
                     backend: str, stds: Optional[List[float]] = None) -> None:
    """NoisyTune in place over contiguous tensors of one device and dtype; tensor k from
    counter ``starts[k]``. ``stds`` (C5, one float per tensor) replaces each tensor's own std:
    a shard perturbed with the std of the whole parameter."""
    if len(starts) != len(tensors) or (stds is not None and len(stds) != len(tensors)):
        raise ValueError(f"apply_noisytune_: {len(tensors)} tensors, {len(starts)} starts"
                         + ("" if stds is None else f", {len(stds)} stds"))
    if not tensors:
        return
    chosen = resolve_backend(backend, tensors[0].device, tensors[0].dtype, op="noisytune")
    extra = {} if stds is None else {"stds": [float(s) for s in stds]}
    chosen.noisytune_(list(tensors), lam, seed=as_uint64(seed),
                      starts=[as_uint64(s) for s in starts], **extra)


@apply_noisytune_.register_fake
def _(tensors, lam, seed, starts, backend, stds=None):
    return None
