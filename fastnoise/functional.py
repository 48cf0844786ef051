"""The functional API of the noisy embedding, mirroring ``torch.nn.functional``: checks,
scale, dispatch.

The math lives in :mod:`fastnoise.reference`, the kernels in the backends, the op and its
autograd in :mod:`fastnoise.ops`, seeds in :mod:`fastnoise.seeds`. This file validates
arguments and turns them into what the op takes (scale, per-token scale, seed). NoisyTune's
frontend is :mod:`fastnoise.noisytune`.
"""

from __future__ import annotations

import math
import operator
from numbers import Real
from typing import Optional

import torch

from . import errors, ops, reference
from .backends import get_backend
from .seeds import check_seed

__all__ = ["noisy_embedding", "METHODS", "NOISE_KINDS", "check_method", "check_noise",
           "check_nonnegative"]

NOISE_KINDS = reference.NOISE_KINDS
#: method presets for NoisyEmbedding / patch: (noise kind, symmetric)
METHODS = {
    "neftune": ("uniform", False),
    "gaussian": ("gaussian", False),
    "symnoise": ("bernoulli", True),
}


# --------------------------------------------------------------------------------------
# Argument checks (shared by the module and the integrations)
# --------------------------------------------------------------------------------------
def check_noise(noise: str) -> str:
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise!r}; expected one of {NOISE_KINDS}")
    return noise


def check_method(method: str):
    """(noise kind, symmetric) of a method name; "" and other non-methods raise."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}") from None


def check_nonnegative(name: str, value) -> float:
    value = check_finite(name, value)
    if not torch.compiler.is_compiling() and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_finite(name: str, value) -> float:
    if torch.compiler.is_compiling():
        return value  # may be symbolic (dynamic=True); NoisyEmbedding checked it when built
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_ids(input: torch.Tensor) -> None:
    """Type checks; the range check (a device sync) runs inside the op."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor of token ids, got {type(input).__name__}")
    if input.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input ids must be int32 or int64, got {input.dtype}")


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_embeddings, embedding_dim), "
                         f"got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")


def _check_like_input(name: str, value, input: torch.Tensor) -> None:
    """attention_mask / position_ids: an integer or bool tensor shaped like the ids."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.shape != input.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
        raise ValueError(f"{name} must have the shape of input {tuple(input.shape)}, got {shape}")
    if value.device != input.device:
        raise ValueError(f"{name} is on {value.device}, input on {input.device}")
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must be bool or integer, got {value.dtype}")


def _check_cu_seqlens(cu_seqlens, input: torch.Tensor) -> None:
    """Metadata only; the values are checked on the device (no host sync)."""
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1
            or cu_seqlens.is_floating_point() or cu_seqlens.is_complex()
            or cu_seqlens.dtype == torch.bool or cu_seqlens.numel() < 1):
        raise ValueError("cu_seqlens must be a 1-D integer tensor of sequence boundaries "
                         "[0, len_0, len_0 + len_1, ..., input.numel()]")
    if cu_seqlens.device != input.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, input on {input.device}")


def check_padding_idx(padding_idx, num_embeddings: int) -> Optional[int]:
    """None, or an int in [-V, V) normalised to [0, V) (as nn.Embedding)."""
    if padding_idx is None:
        return None
    try:
        if isinstance(padding_idx, (bool, torch.Tensor)):
            raise TypeError
        padding_idx = operator.index(padding_idx)
    except TypeError:
        raise TypeError(f"padding_idx must be an int or None, got "
                        f"{type(padding_idx).__name__} {padding_idx!r}") from None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx {padding_idx} is out of range for "
                         f"{num_embeddings} embeddings")
    return padding_idx % num_embeddings


def _packing_scale(input, alpha, d, length, attention_mask, position_ids, cu_seqlens):
    """The per-token scale (N,) for masks and packed rows, with the packing inputs' values
    checked on the device: invalid ones make the scale NaN and are recorded for
    :mod:`fastnoise.errors` (raised at once on the CPU, by a later call on CUDA)."""
    n = input.numel()
    segments, n_segments, valid, code = None, None, None, 0
    if cu_seqlens is not None:
        segments = reference.segments_from_cu_seqlens(cu_seqlens, n)
        n_segments = cu_seqlens.numel() - 1
        valid, code = reference.packing_is_valid(n, cu_seqlens=cu_seqlens), errors.BAD_CU_SEQLENS
    elif position_ids is not None:
        segments = reference.segments_from_position_ids(position_ids)
        valid = reference.packing_is_valid(n, position_ids=position_ids)
        code = errors.BAD_POSITION_IDS
    tok_mag = reference.token_scale(alpha, d, seq_len=length, attention_mask=attention_mask,
                                    segments=segments, n_segments=n_segments, valid=valid)
    if valid is not None and not torch.compiler.is_compiling():
        errors.record_invalid_packing(input.device, valid, code, n)
        if input.device.type == "cpu":
            errors.after_call(input.device)
    return tok_mag


# --------------------------------------------------------------------------------------
# Noisy embedding
# --------------------------------------------------------------------------------------
def noisy_embedding(input: torch.Tensor, weight: torch.Tensor, *, noise: str = "uniform",
                    alpha: float = 5.0, symmetric: bool = False,
                    attention_mask: Optional[torch.Tensor] = None,
                    padding_idx: Optional[int] = None, seed: Optional[int] = None,
                    backend: str = "auto", position_ids: Optional[torch.Tensor] = None,
                    cu_seqlens: Optional[torch.Tensor] = None,
                    embed_scale: float = 1.0) -> torch.Tensor:
    """Embedding lookup plus NEFTune-style noise, fused: ``weight[input] + mag * xi``.

    Args:
        input: int32/int64 token ids, shape (L,), (B, L) or more leading dims.
        weight: (num_embeddings, embedding_dim) float tensor.
        noise: "uniform" (NEFTune, xi ~ U(-1, 1)), "gaussian" (xi ~ N(0, 1)) or
            "bernoulli" (SymNoise, xi uniform on {-1, +1}).
        alpha: noise strength; mag = alpha / sqrt(L * d).
        symmetric: return ``cat([e + n, e - n])`` along dim 0 (the batch doubles).
        attention_mask: same shape as ``input``; L is each sequence's count of ones and
            masked positions get no noise. Without it, L is the padded length
            ``input.shape[-1]`` and every position gets noise (the Hugging Face hook).
        padding_idx: row of ``weight`` that gets no gradient, as in ``F.embedding``.
        seed: 64-bit seed of the Philox stream; None draws one from torch's default
            generator for the device (so ``torch.manual_seed`` makes runs repeatable).
        backend: "auto", "reference", "triton", "cuda" or "cpu".
        position_ids: packed rows (several examples per row, as TRL's packing makes): a new
            sequence starts wherever ``position_ids`` is 0, and L is each sequence's own length.
        cu_seqlens: the same for flash-attention's varlen layout: sequence boundaries
            ``[0, len_0, len_0 + len_1, ..., input.numel()]`` over the flattened ids.
        embed_scale: a scaled embedding's factor (Gemma: sqrt(d)): the rows are multiplied
            by it in the weight's dtype, as the model's own embedding does, and the noise is
            added to the scaled rows (where the Hugging Face hook adds it). Fused in the kernel.

    Returns:
        (*input.shape, d), or with ``symmetric`` (2 * input.shape[0], *input.shape[1:], d).
    """
    _check_weight(weight)
    noise = check_noise(noise)
    alpha = check_nonnegative("alpha", alpha)
    seed = check_seed(seed)
    embed_scale = check_finite("embed_scale", embed_scale)
    _check_ids(input)
    if input.device != weight.device:
        raise ValueError(f"input is on {input.device} but weight is on {weight.device}")
    padding_idx = check_padding_idx(padding_idx, weight.shape[0])
    d = weight.shape[1]
    _check_like_input("attention_mask", attention_mask, input)
    _check_like_input("position_ids", position_ids, input)
    if cu_seqlens is not None:
        if position_ids is not None:
            raise ValueError("pass position_ids or cu_seqlens, not both: each defines the "
                             "packed sequences")
        _check_cu_seqlens(cu_seqlens, input)
    if backend != "auto":
        get_backend(backend)  # an unknown name fails here; availability inside the op
    if symmetric:
        if input.dim() == 0:
            raise ValueError("symmetric=True needs at least one dimension to double")
        out_shape = (2 * input.shape[0],) + tuple(input.shape[1:]) + (d,)
    else:
        out_shape = tuple(input.shape) + (d,)

    length = input.shape[-1] if input.dim() > 0 else 1  # a symbolic size under compile
    tok_mag = None
    if attention_mask is not None or position_ids is not None or cu_seqlens is not None:
        tok_mag = _packing_scale(input, alpha, d, length, attention_mask, position_ids,
                                 cu_seqlens)
    ids = input.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    if d > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    out = ops.call_noisy_embedding(weight, ids, tok_mag, noise, alpha, length,
                                   ops.as_int64(seed or 0), 0, seed is None, symmetric,
                                   -1 if padding_idx is None else padding_idx, backend,
                                   embed_scale)
    return out.view(out_shape)
