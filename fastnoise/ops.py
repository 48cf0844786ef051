"""The op layer: what a noisy-embedding call runs, settled once per (backend, device, dtype).

Two ops do the user-facing work, with the same arguments (the ids of any shape, the mask or
packing inputs, the noise code, alpha, the seed, ...), each computing the scale, drawing the
seed and running the fused kernel inside, so that one call is one dispatch:

* ``torch.ops.fastnoise.noisy_embedding``, the C++ op of the compiled backends ("cpu",
  "cuda"), declared in csrc/fastnoise.cpp with its autograd in C++ (csrc/autograd.cpp).
  Eager calls enter it through ``fastnoise._C.noisy_embedding`` (the same op, its arguments
  parsed without schema matching); torch.compile traces the op itself.
* ``torch.ops.fastnoise.noisy_embedding_python``, a ``torch.library`` custom op for the
  Python backends ("triton", "reference"), with a ``backend`` argument more.

Both are tagged ``nondeterministic_seeded`` (no compiler pass deduplicates or recomputes
them), have fake implementations (torch.compile traces them without running them) and read
no tensor data on the host (no sync). :func:`settle` picks the op and what surrounds it
(error reporting per device) once; the frontends keep the result.

``torch.ops.fastnoise.apply_noisytune_`` perturbs a list of tensors in place (NoisyTune).
Seeds and counter offsets are uint64 carried as int64 bit patterns (the schema's ``int``).
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional

import torch

from . import errors, reference
from .backends import _REGISTRY, REGISTRY_VERSION, resolve_backend
from .seeds import draw_seed as draw, rank_seed_mask

_U64 = 1 << 64
#: noise kind -> the int code the ops take (csrc/noise.h's NoiseKind)
NOISE_CODES = {"uniform": 0, "gaussian": 1, "bernoulli": 2}
NOISE_KINDS = tuple(NOISE_CODES)


def as_int64(value: int) -> int:
    """uint64 -> the int64 with the same bits."""
    value = int(value) % _U64
    return value - _U64 if value >= 1 << 63 else value


def as_uint64(value: int) -> int:
    return int(value) % _U64


#: the device seed tensor of the last Python-backend call captured into a CUDA graph (its
#: value after a replay is the seed that replay used; tests and debugging read it)
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


@functools.lru_cache(maxsize=256)
def round_embed_scale(embed_scale: float, dtype: torch.dtype) -> float:
    """embed_scale rounded to the dtype, as a scaled embedding holds it (cached)."""
    return reference.round_to_dtype(embed_scale, dtype)


# --------------------------------------------------------------------------------------
# The settled call
# --------------------------------------------------------------------------------------
class SettledCall:
    """One backend on one device and weight dtype, resolved and prepared: calling it runs the
    op with no further lookups. ``seed`` None draws a fresh seed from torch's generator of
    the device (rank-distinct under torch.distributed); an int is used as given.

    The C++ op when the forward's backend is compiled ("cpu", "cuda") and "auto" picks the same
    backend for the backward; else the Python op, whose forward and backward resolve the
    backend each on its own (``AUTO_ORDER`` is per op)."""

    __slots__ = ("requested", "backend", "device", "dtype", "version", "key", "impl", "_entry",
                 "_report", "_cuda")

    def __init__(self, requested: str, device: torch.device, dtype: torch.dtype):
        self.requested = requested  # the name asked for ("auto" included)
        forward = resolve_backend(requested, device, dtype)
        backward = resolve_backend(requested, device, dtype, op="backward")
        self.backend = forward.name
        self.device, self.dtype = device, dtype
        self.version = REGISTRY_VERSION[0]  # the registry (and AUTO_ORDER) it was settled with
        # where the registry holds the forward's backend (tests plant doubles under a name)
        self.impl = forward
        self.key = next(name for name, b in _REGISTRY.items() if b is forward)
        self._cuda = device.type == "cuda"
        # made now, outside any CUDA graph capture (the kernels record into it)
        errors.error_buffer(device)
        # the C++ op's eager entry (None: the Python op)
        self._entry = getattr(forward, "fused_entry", None) if backward is forward else None
        # the CUDA kernels may record a bad id at any call; the C++ CPU op raises on bad ids
        # itself and records only invalid packing inputs (the Python op reports its own)
        self._report = self._cuda

    def __call__(self, weight, input, attention_mask, position_ids, cu_seqlens, noise, alpha,
                 seed, symmetric, padding_idx, embed_scale):
        draw_seed = seed is None
        if draw_seed:  # the op XORs the drawn seed with the rank's mask
            seed = rank_seed_mask()
        entry = self._entry
        if entry is None:  # a Python backend: its custom op (eager or traced alike)
            _check_tensors(attention_mask=attention_mask, position_ids=position_ids,
                           cu_seqlens=cu_seqlens)
            return noisy_embedding_python(weight, input, attention_mask, position_ids,
                                          cu_seqlens, noise, alpha, seed, 0, draw_seed,
                                          symmetric, padding_idx, embed_scale, self.requested)
        if torch.compiler.is_compiling():
            return torch.ops.fastnoise.noisy_embedding.default(
                weight, input, attention_mask, position_ids, cu_seqlens, noise, alpha, seed, 0,
                draw_seed, symmetric, padding_idx, embed_scale)
        if self._cuda:
            errors.poll(self.device)
        out = entry(weight, input, attention_mask, position_ids, cu_seqlens, noise, alpha, seed,
                    0, draw_seed, symmetric, padding_idx, embed_scale)
        if self._report or position_ids is not None or cu_seqlens is not None:
            errors.after_call(self.device)
        return out


def _check_tensors(**optional) -> None:
    """What the C++ op's entry says of a non-tensor input, before the custom op's schema
    refuses it with a RuntimeError."""
    for name, value in optional.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"fastnoise: {name} must be a tensor, got {type(value).__name__}")


_SETTLED: Dict[tuple, SettledCall] = {}


def settle(backend: str, device: torch.device, dtype: torch.dtype) -> SettledCall:
    """The settled call (cached) of ``backend`` ("auto" included) for weights of this device
    and dtype; raises :class:`~fastnoise.BackendUnavailableError` when it cannot run there."""
    key = (backend, device, dtype)
    call = _SETTLED.get(key)
    if (call is None or call.version != REGISTRY_VERSION[0]
            or _REGISTRY.get(call.key) is not call.impl):
        call = _SETTLED[key] = SettledCall(backend, device, dtype)
    return call


# --------------------------------------------------------------------------------------
# Argument checks of the Python backends' op (the C++ op checks the same in C++).
# Metadata only (shape, stride, dtype, device): no host sync.
# --------------------------------------------------------------------------------------
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"fastnoise: {message}")


def _check_ids_tensor(ids: torch.Tensor, device: torch.device) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastnoise: input ids must be int32 or int64, got {ids.dtype}")
    _require(ids.device == device, f"input is on {ids.device} but weight is on {device}")


def _check_like_ids(name: str, value, ids: torch.Tensor) -> None:
    """attention_mask / position_ids: an integer or bool tensor shaped like the ids."""
    if value is None:
        return
    _require(value.shape == ids.shape, f"{name} must have the shape of input "
             f"{tuple(ids.shape)}, got {tuple(value.shape)}")
    _require(value.device == ids.device, f"{name} is on {value.device}, input on {ids.device}")
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"fastnoise: {name} must be bool or integer, got {value.dtype}")


def check_forward_args(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha,
                       symmetric, padding_idx) -> None:
    _require(noise in (0, 1, 2), f"noise code must be 0 (uniform), 1 (gaussian) or 2 "
             f"(bernoulli), got {noise}")
    if not weight.is_floating_point():
        raise TypeError(f"fastnoise: weight must be floating point, got {weight.dtype}")
    _require(weight.dim() == 2, f"weight must be 2-D (num_embeddings, embedding_dim), got "
             f"shape {tuple(weight.shape)}")
    _check_ids_tensor(ids, weight.device)
    _require(alpha >= 0, f"alpha must be finite and >= 0, got {alpha}")
    _require(not symmetric or ids.dim() > 0,
             "symmetric=True needs at least one dimension to double")
    _require(-1 <= padding_idx < weight.shape[0], f"padding_idx must be -1 (none) or in "
             f"[0, {weight.shape[0]}), got {padding_idx}")
    _check_like_ids("attention_mask", attention_mask, ids)
    _check_like_ids("position_ids", position_ids, ids)
    if cu_seqlens is not None:
        _require(position_ids is None, "pass position_ids or cu_seqlens, not both: each "
                 "defines the packed sequences")
        _require(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 1
                 and not cu_seqlens.is_floating_point() and not cu_seqlens.is_complex()
                 and cu_seqlens.dtype != torch.bool,
                 "cu_seqlens must be a 1-D integer tensor of sequence boundaries "
                 "[0, len_0, len_0 + len_1, ..., input.numel()]")
        _require(cu_seqlens.device == ids.device,
                 f"cu_seqlens is on {cu_seqlens.device}, input on {ids.device}")


def check_backward_args(grad_out, ids, num_weights, symmetric) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastnoise: ids must be int32 or int64, got {ids.dtype}")
    if not grad_out.is_floating_point():
        raise TypeError(f"fastnoise: grad_out must be floating point, got {grad_out.dtype}")
    _require(grad_out.dim() == ids.dim() + 1,
             f"grad_out must have the output's shape (*ids.shape, d), got "
             f"{tuple(grad_out.shape)} for ids of shape {tuple(ids.shape)}")
    rows = grad_out.numel() // grad_out.shape[-1] if grad_out.numel() else None
    _require(rows is None or rows == (2 if symmetric else 1) * ids.numel(),
             f"grad_out must have {'2 x ' if symmetric else ''}the {ids.numel()} tokens' rows, "
             f"got shape {tuple(grad_out.shape)}")
    _require(num_weights >= 0, f"num_weights must be >= 0, got {num_weights}")
    _require(ids.device == grad_out.device,
             f"ids are on {ids.device}, grad_out on {grad_out.device}")


def output_shape(ids: torch.Tensor, d: int, symmetric: bool):
    shape = list(ids.shape) + [d]
    if symmetric:
        shape[0] = 2 * shape[0]
    return shape


# --------------------------------------------------------------------------------------
# The Python backends' op: torch.ops.fastnoise.noisy_embedding_python
# --------------------------------------------------------------------------------------
def _packing_scale(chosen, ids, alpha, d, length, attention_mask, position_ids, cu_seqlens):
    """The per-token scale (N,) of a mask or packed rows, with invalid packing inputs recorded
    in the device's error buffer (no host sync): the backend's own kernel (Triton's), or
    reference.token_scale and device-side tensor ops."""
    n = ids.numel()
    own = getattr(chosen, "token_scale", None)
    if own is not None:
        return own(alpha, d, n, length, attention_mask, position_ids, cu_seqlens,
                   errors.error_buffer(ids.device))
    tok_mag = reference.token_scale(alpha, d, n, length, attention_mask=attention_mask,
                                    position_ids=position_ids, cu_seqlens=cu_seqlens)
    if position_ids is not None or cu_seqlens is not None:
        valid = reference.packing_is_valid(n, cu_seqlens=cu_seqlens, position_ids=position_ids)
        code = errors.BAD_CU_SEQLENS if cu_seqlens is not None else errors.BAD_POSITION_IDS
        errors.record_invalid_packing(ids.device, valid, code, n)
    return tok_mag


@torch.library.custom_op("fastnoise::noisy_embedding_python", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def noisy_embedding_python(weight: torch.Tensor, ids: torch.Tensor,
                           attention_mask: Optional[torch.Tensor],
                           position_ids: Optional[torch.Tensor],
                           cu_seqlens: Optional[torch.Tensor], noise: int, alpha: float,
                           seed: int, offset: int, draw_seed: bool, symmetric: bool,
                           padding_idx: int, embed_scale: float, backend: str) -> torch.Tensor:
    """``torch.ops.fastnoise.noisy_embedding`` (see csrc/fastnoise.cpp for the arguments) run
    by a Python backend ("triton", "reference")."""
    return python_forward(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha,
                          seed, offset, draw_seed, symmetric, padding_idx, embed_scale, backend)


def python_forward(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha, seed,
                   offset, draw_seed, symmetric, padding_idx, embed_scale, backend):
    """The body of ``noisy_embedding_python``."""
    check_forward_args(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha,
                       symmetric, padding_idx)
    chosen = resolve_backend(backend, weight.device, weight.dtype)
    kind = NOISE_KINDS[noise]
    flat = ids.reshape(-1)
    n, d = flat.numel(), weight.shape[1]
    out = torch.empty(output_shape(ids, d, symmetric), dtype=weight.dtype, device=weight.device)
    if n == 0 or d == 0:
        return out
    if d > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    length = ids.shape[-1] if ids.dim() > 0 else 1
    tok_mag = None
    if attention_mask is not None or position_ids is not None or cu_seqlens is not None:
        tok_mag = _packing_scale(chosen, ids, alpha, d, length, attention_mask, position_ids,
                                 cu_seqlens)
    extra = {}
    if draw_seed:
        mask = seed  # what the drawn seed is XORed with (the rank's)
        if capturing(weight):
            # inside a CUDA graph a host-drawn seed would be frozen into the graph: draw it on
            # the device instead (PyTorch's RNG advances on every replay)
            seed_tensor = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=weight.device)
            if mask:
                seed_tensor = seed_tensor ^ mask
            extra["seed_tensor"] = seed_tensor
            LAST_CAPTURED_SEED[0] = seed_tensor  # graph memory: holds each replay's seed
            seed, offset = 0, 0
        else:
            seed, offset = draw(weight.device, reference.counters_used(kind, n, d))
            seed ^= as_uint64(mask)
    if chosen.name == "reference":
        check_id_range(flat, weight.shape[0])  # the definition may sync; kernels do not
    else:
        extra["error"] = errors.error_buffer(weight.device)
    errors.poll(weight.device)
    chosen.embedding_forward(flat.contiguous(), weight, out.view(-1, d), noise=kind,
                             mag=reference.noise_scale(alpha, length, d), tok_mag=tok_mag,
                             seed=as_uint64(seed), offset=as_uint64(offset), symmetric=symmetric,
                             embed_scale=round_embed_scale(float(embed_scale), weight.dtype), **extra)
    errors.after_call(weight.device)  # a bad id or invalid packing: CPU raises now
    return out


@noisy_embedding_python.register_fake
def _(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha, seed, offset,
      draw_seed, symmetric, padding_idx, embed_scale, backend):
    check_forward_args(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha,
                       symmetric, padding_idx)
    return weight.new_empty(output_shape(ids, weight.shape[1], symmetric))


@torch.library.custom_op("fastnoise::noisy_embedding_backward_python", mutates_args=())
def noisy_embedding_backward_python(grad_out: torch.Tensor, ids: torch.Tensor, num_weights: int,
                                    padding_idx: int, symmetric: bool, embed_scale: float,
                                    backend: str) -> torch.Tensor:
    """``torch.ops.fastnoise.noisy_embedding_backward`` run by a Python backend: the weight's
    gradient from grad_out shaped like the forward's output."""
    return python_backward(grad_out, ids, num_weights, padding_idx, symmetric, embed_scale,
                           backend)


def python_backward(grad_out, ids, num_weights, padding_idx, symmetric, embed_scale, backend):
    """The body of ``noisy_embedding_backward_python``."""
    check_backward_args(grad_out, ids, num_weights, symmetric)
    d = grad_out.shape[-1]
    chosen = resolve_backend(backend, grad_out.device, grad_out.dtype, op="backward")
    if grad_out.numel() == 0:
        return grad_out.new_zeros(num_weights, d)
    errors.poll(grad_out.device)
    return chosen.embedding_backward(
        grad_out.reshape(-1, d).contiguous(), ids.reshape(-1).contiguous(), num_weights,
        padding_idx=None if padding_idx < 0 else padding_idx, symmetric=symmetric,
        deterministic=torch.are_deterministic_algorithms_enabled(),
        embed_scale=round_embed_scale(float(embed_scale), grad_out.dtype))


@noisy_embedding_backward_python.register_fake
def _(grad_out, ids, num_weights, padding_idx, symmetric, embed_scale, backend):
    check_backward_args(grad_out, ids, num_weights, symmetric)
    return grad_out.new_empty(num_weights, grad_out.shape[-1])


def gather_rows(grad_grad_weight, ids, padding_idx, symmetric, embed_scale):
    """The backward of the backward: d(grad_weight)/d(grad_out) is a gather of rows, shaped
    like grad_out (the C++ op's twin is csrc/autograd.cpp's gather_rows)."""
    flat = ids.reshape(-1)
    rows = grad_grad_weight.index_select(0, flat.long())
    if padding_idx >= 0:
        rows = rows * (flat != padding_idx).unsqueeze(-1).to(rows.dtype)
    embed_scale = round_embed_scale(float(embed_scale), grad_grad_weight.dtype)
    if embed_scale != 1.0:
        rows = rows * embed_scale
    shape = output_shape(ids, grad_grad_weight.shape[1], symmetric)
    return (torch.cat([rows, rows]) if symmetric else rows).reshape(shape)


def _setup_context(ctx, inputs, output):
    weight, ids = inputs[0], inputs[1]
    ctx.save_for_backward(ids)
    ctx.num_weights = weight.shape[0]
    ctx.symmetric, ctx.padding_idx = inputs[10], inputs[11]
    ctx.embed_scale, ctx.backend = inputs[12], inputs[13]


def _op_backward(ctx, grad_out):
    grad_weight = None
    if ctx.needs_input_grad[0]:
        (ids,) = ctx.saved_tensors
        grad_weight = noisy_embedding_backward_python(grad_out, ids, ctx.num_weights,
                                                      ctx.padding_idx, ctx.symmetric,
                                                      ctx.embed_scale, ctx.backend)
    return (grad_weight,) + (None,) * 13


noisy_embedding_python.register_autograd(_op_backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.padding_idx, ctx.symmetric, ctx.embed_scale = inputs[3], inputs[4], inputs[5]


def _backward_op_backward(ctx, grad_grad_weight):
    (ids,) = ctx.saved_tensors
    return (gather_rows(grad_grad_weight, ids, ctx.padding_idx, ctx.symmetric,
                        ctx.embed_scale),) + (None,) * 6


noisy_embedding_backward_python.register_autograd(_backward_op_backward,
                                                  setup_context=_backward_setup_context)


# --------------------------------------------------------------------------------------
# NoisyTune
# --------------------------------------------------------------------------------------
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
