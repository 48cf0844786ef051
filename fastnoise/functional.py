"""The functional API of the noisy embedding, mirroring ``torch.nn.functional``.

The math lives in :mod:`fastnoise.reference`, the kernels in the backends, the ops (which
compute the scale, draw the seed and run the kernel in one dispatch) and the settled call in
:mod:`fastnoise.ops`. This file checks what the ops cannot (the noise name, alpha, the seed,
padding_idx; once per distinct value) and calls the settled op. NoisyTune's frontend is
:mod:`fastnoise.noisytune`.
"""

from __future__ import annotations

import math
import operator
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F

from . import ops, reference
from .seeds import check_seed

__all__ = ["noisy_embedding", "plain_embedding", "METHODS", "NOISE_KINDS", "check_method",
           "check_noise", "check_nonnegative"]

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


def plain_embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int] = None,
                    embed_scale: float = 1.0) -> torch.Tensor:
    """The noise-free lookup: exactly ``F.embedding`` (times a scaled embedding's factor, in
    the weight's dtype, as the model's own scaled embedding computes it)."""
    out = F.embedding(input, weight, padding_idx)
    if embed_scale != 1.0:
        out = out * ops.round_embed_scale(float(embed_scale), out.dtype)
    return out


_SETTINGS: dict = {}


def _settings(noise, alpha, embed_scale):
    """(noise code, alpha, embed_scale) checked: once per distinct value (a dict hit after)."""
    key = (noise, alpha, embed_scale)
    try:
        return _SETTINGS[key]
    except (KeyError, TypeError):  # new, or unhashable (the checks below say what is wrong)
        pass
    settings = (ops.NOISE_CODES[check_noise(noise)], check_nonnegative("alpha", alpha),
                check_finite("embed_scale", embed_scale))
    if len(_SETTINGS) < 4096 and not torch.compiler.is_compiling():
        _SETTINGS[key] = settings
    return settings


# --------------------------------------------------------------------------------------
# Noisy embedding
# --------------------------------------------------------------------------------------
def noisy_embedding(input: torch.Tensor, weight: torch.Tensor, *, noise: str = "uniform",
                    alpha: float = 5.0, symmetric: bool = False,
                    attention_mask: Optional[torch.Tensor] = None,
                    padding_idx: Optional[int] = None, seed: Optional[int] = None,
                    backend: str = "auto", position_ids: Optional[torch.Tensor] = None,
                    cu_seqlens: Optional[torch.Tensor] = None,
                    embed_scale: float = 1.0, training: bool = True) -> torch.Tensor:
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
        training: as ``F.dropout``'s: False returns the plain embedding (no noise, no pair).

    Returns:
        (*input.shape, d), or with ``symmetric`` (2 * input.shape[0], *input.shape[1:], d).

    The backend is resolved once per (backend, device, dtype) and kept; the scale, the seed and
    the lookup run inside one op (the C++ op for "cpu"/"cuda", one dispatch with its autograd
    in C++), which checks the tensors' metadata and never reads their data on the host.
    """
    if not training:
        return plain_embedding(input, weight, padding_idx, embed_scale)
    code, alpha, embed_scale = _settings(noise, alpha, embed_scale)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor of token ids, got {type(input).__name__}")
    call = ops.settle(backend, weight.device, weight.dtype)
    if padding_idx is not None:
        padding_idx = check_padding_idx(padding_idx, weight.shape[0])
    if seed is not None:
        seed = ops.as_int64(check_seed(seed))
    return call(weight, input, attention_mask, position_ids, cu_seqlens, code, alpha, seed,
                bool(symmetric), -1 if padding_idx is None else padding_idx, embed_scale)
