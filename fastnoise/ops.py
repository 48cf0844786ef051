"""The public ops as ``torch.library`` custom ops: opaque to torch.compile (no graph break),
with fake implementations and registered autograd.

* ``torch.ops.fastnoise.noisy_embedding`` -> (N, d) or (2N, d); its gradient is
  ``torch.ops.fastnoise.noisy_embedding_backward``.
* ``torch.ops.fastnoise.apply_noisytune_`` perturbs a list of tensors in place.

The op bodies run eagerly, also inside a compiled graph: they check their arguments'
metadata (shape, stride, dtype, device: never the data, no host sync), pick the backend and,
when asked to, draw a fresh seed from torch's default generator, so every call of a compiled
model gets new noise. Bad ids are found by the kernels (:mod:`fastnoise.errors`). Seeds and counter offsets are uint64 carried
as int64 bit patterns (the schema's ``int``).
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch

from . import errors, reference
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
    """The host-side id check of the ``reference`` backend (one device sync)."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = torch.stack([lo, hi]).tolist()
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise IndexError(f"token id {bad} is out of range [0, {num_embeddings})")


@functools.lru_cache(maxsize=4096)
def _scale(alpha: float, length: int, d: int) -> float:
    return reference.noise_scale(alpha, length, d)


@functools.lru_cache(maxsize=256)
def _embed_scale(embed_scale: float, dtype: torch.dtype) -> float:
    return reference.round_to_dtype(embed_scale, dtype)


# --------------------------------------------------------------------------------------
# Argument checks of the ops: public entry points (torch.compile calls them, so can users).
# Metadata only (shape, stride, dtype, device): no host sync.
# --------------------------------------------------------------------------------------
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"fastnoise: {message}")


def _check_ids_tensor(ids: torch.Tensor, device: torch.device) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastnoise: ids must be int32 or int64, got {ids.dtype}")
    _require(ids.dim() == 1 and ids.is_contiguous(),
             f"ids must be 1-D and contiguous (flattened), got shape {tuple(ids.shape)} "
             f"with strides {ids.stride()}")
    _require(ids.device == device, f"ids are on {ids.device}, the weight on {device}")


def check_forward_args(weight: torch.Tensor, ids: torch.Tensor,
                       tok_mag: Optional[torch.Tensor], symmetric: bool) -> None:
    _require(weight.dim() == 2, f"weight must be 2-D (V, d), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"fastnoise: weight must be floating point, got {weight.dtype}")
    _require(weight.shape[1] <= 1 or weight.stride(1) == 1,
             f"weight rows must be contiguous (stride(1) == 1), got strides {weight.stride()}")
    _check_ids_tensor(ids, weight.device)
    if tok_mag is not None:
        if tok_mag.dtype != torch.float32:
            raise TypeError(f"fastnoise: tok_mag must be float32, got {tok_mag.dtype}")
        _require(tok_mag.dim() == 1 and tok_mag.numel() == ids.numel()
                 and tok_mag.is_contiguous(),
                 f"tok_mag must be contiguous with one entry per token ({ids.numel()}), got "
                 f"shape {tuple(tok_mag.shape)} with strides {tok_mag.stride()}")
        _require(tok_mag.device == weight.device,
                 f"tok_mag is on {tok_mag.device}, the weight on {weight.device}")


def check_backward_args(grad_out: torch.Tensor, ids: torch.Tensor, num_weights: int,
                        symmetric: bool) -> None:
    _check_ids_tensor(ids, grad_out.device)
    rows = ids.numel() * (2 if symmetric else 1)
    _require(grad_out.dim() == 2 and grad_out.shape[0] == rows,
             f"grad_out must have {rows} rows ({'2 x ' if symmetric else ''}the {ids.numel()} "
             f"tokens), got shape {tuple(grad_out.shape)}")
    if not grad_out.is_floating_point():
        raise TypeError(f"fastnoise: grad_out must be floating point, got {grad_out.dtype}")
    _require(num_weights >= 0, f"num_weights must be >= 0, got {num_weights}")


# --------------------------------------------------------------------------------------
# Forward and backward bodies (shared by the custom ops and the eager autograd path)
# --------------------------------------------------------------------------------------
def _forward(weight, ids, tok_mag, noise, alpha, length, seed, offset, draw_seed, symmetric,
             backend, embed_scale):
    check_forward_args(weight, ids, tok_mag, symmetric)
    chosen = resolve_backend(backend, weight.device, weight.dtype)
    d = weight.shape[1]
    mag = _scale(float(alpha), int(length), d)
    embed_scale = _embed_scale(float(embed_scale), weight.dtype)
    extra = {}
    if capturing(weight):
        # Inside a CUDA graph a host-drawn seed would be frozen into the graph: draw it on
        # the device instead (PyTorch's RNG advances on every replay).
        if draw_seed:
            seed_tensor = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=weight.device)
            mask = rank_seed_mask()
            if mask:  # rank-distinct, as draw_seed does on the host
                seed_tensor = seed_tensor ^ as_int64(mask)
            extra["seed_tensor"] = seed_tensor
            LAST_CAPTURED_SEED[0] = seed_tensor  # graph memory: holds each replay's seed
            seed, offset = 0, 0
    elif draw_seed:
        seed, offset = draw(weight.device, reference.counters_used(noise, ids.numel(), d),
                            rank_distinct=True)
    out = torch.empty(ids.numel() * (2 if symmetric else 1), d, dtype=weight.dtype,
                      device=weight.device)
    if ids.numel() and d:
        if chosen.name == "reference":
            check_id_range(ids, weight.shape[0])  # the definition may sync; kernels do not
        else:
            errors.poll(weight.device)
            extra["error"] = errors.error_buffer(weight.device)
        chosen.embedding_forward(ids, weight, out, noise=noise, mag=mag, tok_mag=tok_mag,
                                 seed=as_uint64(seed), offset=as_uint64(offset),
                                 symmetric=symmetric, embed_scale=embed_scale, **extra)
        if "error" in extra and chosen.name != "cpu":  # the C++ CPU kernels raise at once
            errors.after_call(weight.device)
    return out


def _backward(grad_out, ids, num_weights, padding_idx, symmetric, backend, embed_scale):
    check_backward_args(grad_out, ids, num_weights, symmetric)
    embed_scale = _embed_scale(float(embed_scale), grad_out.dtype)  # as the forward rounded it
    chosen = resolve_backend(backend, grad_out.device, grad_out.dtype, op="backward")
    if grad_out.shape[0] == 0 or grad_out.shape[1] == 0:
        return grad_out.new_zeros(num_weights, grad_out.shape[1])
    errors.poll(grad_out.device)
    return chosen.embedding_backward(
        grad_out.contiguous(), ids, num_weights,
        padding_idx=None if padding_idx < 0 else padding_idx, symmetric=symmetric,
        deterministic=torch.are_deterministic_algorithms_enabled(), embed_scale=embed_scale)


def _grad_of_backward(grad_grad_weight, ids, padding_idx, symmetric, embed_scale):
    """The backward of the backward: d(grad_weight)/d(grad_out) is a gather of rows."""
    rows = grad_grad_weight.index_select(0, ids.long())
    if padding_idx >= 0:
        rows = rows * (ids != padding_idx).unsqueeze(-1).to(rows.dtype)
    embed_scale = _embed_scale(float(embed_scale), grad_grad_weight.dtype)
    if embed_scale != 1.0:
        rows = rows * embed_scale
    return torch.cat([rows, rows]) if symmetric else rows


# --------------------------------------------------------------------------------------
# Custom ops (what torch.compile traces)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fastnoise::noisy_embedding", mutates_args=())
def noisy_embedding(weight: torch.Tensor, ids: torch.Tensor, tok_mag: Optional[torch.Tensor],
                    noise: str, alpha: float, length: int, seed: int, offset: int,
                    draw_seed: bool, symmetric: bool, padding_idx: int, backend: str,
                    embed_scale: float = 1.0) -> torch.Tensor:
    """Fused noisy embedding of the flat ``ids``: scale ``alpha / sqrt(length * d)`` (computed
    here, so ``length`` may be a symbolic size under torch.compile) or the per-token
    ``tok_mag``; ``padding_idx`` < 0 means none (it only matters for the gradient). With
    ``draw_seed`` the seed/offset arguments are ignored and drawn from the device's default
    generator (rank-distinct under torch.distributed). ``embed_scale`` (rounded here to the
    weight's dtype, as the model's own scaled embedding does) scales the rows first (Gemma)."""
    return _forward(weight, ids, tok_mag, noise, alpha, length, seed, offset, draw_seed,
                    symmetric, backend, embed_scale)


@noisy_embedding.register_fake
def _(weight, ids, tok_mag, noise, alpha, length, seed, offset, draw_seed, symmetric,
      padding_idx, backend, embed_scale=1.0):
    check_forward_args(weight, ids, tok_mag, symmetric)
    return weight.new_empty(ids.numel() * (2 if symmetric else 1), weight.shape[1])


@torch.library.custom_op("fastnoise::noisy_embedding_backward", mutates_args=())
def noisy_embedding_backward(grad_out: torch.Tensor, ids: torch.Tensor, num_weights: int,
                             padding_idx: int, symmetric: bool, backend: str,
                             embed_scale: float = 1.0) -> torch.Tensor:
    """Gradient of the weight: that of the (scaled) plain embedding, the halves of a pair
    summed; accumulated in float32 (float64 for float64 gradients)."""
    return _backward(grad_out, ids, num_weights, padding_idx, symmetric, backend, embed_scale)


@noisy_embedding_backward.register_fake
def _(grad_out, ids, num_weights, padding_idx, symmetric, backend, embed_scale=1.0):
    check_backward_args(grad_out, ids, num_weights, symmetric)
    return grad_out.new_empty(num_weights, grad_out.shape[-1])


def _setup_context(ctx, inputs, output):
    weight, ids = inputs[0], inputs[1]
    ctx.save_for_backward(ids)
    ctx.num_weights = weight.shape[0]
    ctx.symmetric, ctx.padding_idx, ctx.backend = inputs[9], inputs[10], inputs[11]
    ctx.embed_scale = inputs[12] if len(inputs) > 12 else 1.0


def _op_backward(ctx, grad_out):
    grad_weight = None
    if ctx.needs_input_grad[0]:
        (ids,) = ctx.saved_tensors
        grad_weight = noisy_embedding_backward(grad_out, ids, ctx.num_weights, ctx.padding_idx,
                                               ctx.symmetric, ctx.backend, ctx.embed_scale)
    return (grad_weight,) + (None,) * 12


noisy_embedding.register_autograd(_op_backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.padding_idx, ctx.symmetric = inputs[3], inputs[4]
    ctx.embed_scale = inputs[6] if len(inputs) > 6 else 1.0


def _backward_op_backward(ctx, grad_grad_weight):
    (ids,) = ctx.saved_tensors
    return (_grad_of_backward(grad_grad_weight, ids, ctx.padding_idx, ctx.symmetric,
                              ctx.embed_scale),) + (None,) * 6


noisy_embedding_backward.register_autograd(_backward_op_backward,
                                           setup_context=_backward_setup_context)


# --------------------------------------------------------------------------------------
# Eager autograd (no custom-op dispatch: tens of microseconds less per call)
# --------------------------------------------------------------------------------------
class _EagerWeightGrad(torch.autograd.Function):
    """The backward as a differentiable function (double backward: a gather)."""

    @staticmethod
    def forward(ctx, grad_out, ids, num_weights, config):
        padding_idx, symmetric, backend, scale = config
        ctx.save_for_backward(ids)
        ctx.config = config
        return _backward(grad_out, ids, num_weights, padding_idx, symmetric, backend, scale)

    @staticmethod
    def backward(ctx, grad_grad_weight):
        (ids,) = ctx.saved_tensors
        padding_idx, symmetric, _, scale = ctx.config
        return (_grad_of_backward(grad_grad_weight, ids, padding_idx, symmetric, scale),
                None, None, None)


class _EagerNoisyEmbedding(torch.autograd.Function):
    """The op without the custom-op dispatch: what eager calls use; compiled graphs use the
    custom op. The non-tensor arguments travel as one tuple: apply() pays per argument."""

    @staticmethod
    def forward(ctx, weight, ids, tok_mag, config):
        noise, alpha, length, seed, offset, draw_seed, symmetric, padding_idx, backend, \
            scale = config
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]
        ctx.config = (padding_idx, symmetric, backend, scale)
        return _forward(weight, ids, tok_mag, noise, alpha, length, seed, offset, draw_seed,
                        symmetric, backend, scale)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: keep the backward differentiable
            grad = _EagerWeightGrad.apply(grad_out, ids, ctx.num_weights, ctx.config)
        else:
            padding_idx, symmetric, backend, scale = ctx.config
            grad = _backward(grad_out, ids, ctx.num_weights, padding_idx, symmetric, backend,
                             scale)
        return grad, None, None, None


def call_noisy_embedding(weight, ids, tok_mag, noise, alpha, length, seed, offset, draw_seed,
                         symmetric, padding_idx, backend, embed_scale):
    """Run the op: the custom op while torch.compile traces; in eager mode the lean
    autograd path, or no autograd at all when no gradient is wanted."""
    if torch.compiler.is_compiling():
        return noisy_embedding(weight, ids, tok_mag, noise, alpha, length, seed, offset,
                               draw_seed, symmetric, padding_idx, backend, embed_scale)
    if weight.requires_grad and torch.is_grad_enabled():
        return _EagerNoisyEmbedding.apply(weight, ids, tok_mag, (
            noise, alpha, length, seed, offset, draw_seed, symmetric, padding_idx, backend,
            embed_scale))
    return _forward(weight, ids, tok_mag, noise, alpha, length, seed, offset, draw_seed,
                    symmetric, backend, embed_scale)


def check_noisytune_args(tensors, starts, stds=None) -> None:
    _require(len(starts) == len(tensors),
             f"apply_noisytune_ needs one start counter per tensor: {len(tensors)} tensors, "
             f"{len(starts)} starts")
    _require(stds is None or len(stds) == len(tensors),
             f"apply_noisytune_ needs one std per tensor: {len(tensors)} tensors, "
             f"{0 if stds is None else len(stds)} stds")
    for k, t in enumerate(tensors):
        if not t.is_floating_point():
            raise TypeError(f"fastnoise: NoisyTune perturbs floating-point tensors, tensor {k} "
                            f"is {t.dtype}")
        _require(t.device == tensors[0].device and t.dtype == tensors[0].dtype,
                 f"apply_noisytune_ takes tensors of one device and dtype: tensor 0 is "
                 f"{tensors[0].dtype} on {tensors[0].device}, tensor {k} {t.dtype} on {t.device}")
        _require(t.is_contiguous(), f"apply_noisytune_ needs contiguous tensors (tensor {k})")


@torch.library.custom_op("fastnoise::apply_noisytune_", mutates_args=("tensors",))
def apply_noisytune_(tensors: List[torch.Tensor], lam: float, seed: int, starts: List[int],
                     backend: str, stds: Optional[List[float]] = None) -> None:
    """NoisyTune in place over contiguous tensors of one device and dtype; tensor k from
    counter ``starts[k]``. ``stds`` (C5, one float per tensor) replaces each tensor's own std:
    a shard perturbed with the std of the whole parameter."""
    check_noisytune_args(tensors, starts, stds)
    if not tensors:
        return
    chosen = resolve_backend(backend, tensors[0].device, tensors[0].dtype, op="noisytune")
    extra = {} if stds is None else {"stds": [float(s) for s in stds]}
    chosen.noisytune_(list(tensors), lam, seed=as_uint64(seed),
                      starts=[as_uint64(s) for s in starts], **extra)


@apply_noisytune_.register_fake
def _(tensors, lam, seed, starts, backend, stds=None):
    check_noisytune_args(tensors, starts, stds)
    return None
