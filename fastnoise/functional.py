"""The functional API, mirroring ``torch.nn.functional``: checks, seeds, scale, dispatch.

The math lives in :mod:`fastnoise.reference`, the kernels in the backends, the op and its
autograd in :mod:`fastnoise.ops`. This file validates arguments and turns them into what
the op takes (scale, per-token scale, seed).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Iterable, List, Optional, Union

import torch

from . import ops, reference
from .backends import get_backend, resolve_backend

__all__ = ["noisy_embedding", "noisytune_", "set_rank_distinct_noise", "METHODS",
           "NOISE_KINDS"]

NOISE_KINDS = reference.NOISE_KINDS
#: method presets for NoisyEmbedding / patch: (noise kind, symmetric)
METHODS = {
    "neftune": ("uniform", False),
    "gaussian": ("gaussian", False),
    "symnoise": ("bernoulli", True),
}
_U64 = 1 << 64


# --------------------------------------------------------------------------------------
# Argument checks (shared by the module and the integrations)
# --------------------------------------------------------------------------------------
def check_noise(noise: str) -> str:
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise!r}; expected one of {NOISE_KINDS}")
    return noise


def check_method(method: str):
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}") from None


def check_nonnegative(name: str, value) -> float:
    value = _check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_seed(seed) -> Optional[int]:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


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
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1
            or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 1):
        raise ValueError("cu_seqlens must be a 1-D integer tensor of sequence boundaries")
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    first, last, smallest = torch.stack([cu_seqlens[0], cu_seqlens[-1],
                                         steps.min() if steps.numel() else cu_seqlens[0] * 0]
                                        ).tolist()
    if first != 0 or last != input.numel() or smallest < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to input.numel() = {input.numel()}, "
                         f"got {first} .. {last}")


# --------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------
_RANK_DISTINCT = [True]


def set_rank_distinct_noise(enabled: bool) -> None:
    """Under torch.distributed, embedding noise drawn with ``seed=None`` differs per rank
    (the default: each data-parallel rank sees other noise, even when every rank was seeded
    alike, unlike the Hugging Face hook). ``False`` gives every equally seeded rank the same
    noise; so does passing the same explicit ``seed`` everywhere. NoisyTune is never
    rank-distinct: replicas must stay identical."""
    _RANK_DISTINCT[0] = bool(enabled)


def rank_seed_mask() -> int:
    """What the seed is XORed with to make noise rank-distinct: 0 on rank 0, outside
    torch.distributed, or after ``set_rank_distinct_noise(False)``; used by the host-drawn
    and the device-drawn (CUDA graph) seeds alike."""
    dist = torch.distributed
    if _RANK_DISTINCT[0] and dist.is_available() and dist.is_initialized():
        return (dist.get_rank() * 0x9E3779B97F4A7C15) % _U64  # golden-ratio odd multiplier
    return 0


def draw_seed(device: torch.device, counters: int, rank_distinct: bool = False):
    """(seed, offset) for a call that uses ``counters`` Philox counters, from torch's default
    generator of ``device``: ``torch.manual_seed`` makes runs repeatable, every call differs.

    CPU: a fresh 63-bit seed, offset 0. CUDA: the generator's seed and a counter offset taken
    from its Philox offset, which is advanced past what the call uses (no device sync). With
    ``rank_distinct`` the
    torch.distributed rank is mixed into the seed (see :func:`set_rank_distinct_noise`).
    """
    seed, offset = _draw_seed(device, counters)
    if rank_distinct:
        seed ^= rank_seed_mask()
    return seed, offset


def _draw_seed(device: torch.device, counters: int):
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[idx]
        offset = gen.get_offset()
        # PyTorch's kernels read the generator as curand does: offset o (counted in 32-bit
        # words) is Philox counter o // 4 of each thread's subsequence, and thread 0's
        # subsequence is our counter space. Reserving 4 words a counter and starting at
        # o // 4 gives this call exactly the counters no other draw of the generator uses.
        gen.set_offset(offset + 4 * counters)
        return gen.initial_seed() % _U64, offset // 4
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return seed, 0


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
    embed_scale = _check_finite("embed_scale", embed_scale)
    _check_ids(input)
    if input.device != weight.device:
        raise ValueError(f"input is on {input.device} but weight is on {weight.device}")
    if padding_idx is not None:
        if not -weight.shape[0] <= padding_idx < weight.shape[0]:
            raise ValueError(f"padding_idx {padding_idx} is out of range for "
                             f"{weight.shape[0]} embeddings")
        padding_idx %= weight.shape[0]
    d = weight.shape[1]
    _check_like_input("attention_mask", attention_mask, input)
    _check_like_input("position_ids", position_ids, input)
    if cu_seqlens is not None and not (torch.compiler.is_compiling() or ops.capturing(input)):
        _check_cu_seqlens(cu_seqlens, input)  # syncs; compiled and captured graphs skip it

    if backend != "auto":
        get_backend(backend)  # an unknown name fails here; availability inside the op
    if symmetric:
        if input.dim() == 0:
            raise ValueError("symmetric=True needs at least one dimension to double")
        out_shape = (2 * input.shape[0],) + tuple(input.shape[1:]) + (d,)
    else:
        out_shape = tuple(input.shape) + (d,)
    if input.numel() == 0:
        return weight.new_empty(out_shape)

    length = input.shape[-1] if input.dim() > 0 else 1
    tok_mag, mag = None, reference.noise_scale(alpha, length, d)
    segments = None
    if cu_seqlens is not None:
        segments = reference.segments_from_cu_seqlens(cu_seqlens, input.numel())
    elif position_ids is not None:
        segments = reference.segments_from_position_ids(position_ids)
    if attention_mask is not None or segments is not None:
        tok_mag = reference.token_scale(alpha, d, seq_len=length, attention_mask=attention_mask,
                                        segments=segments)
    ids = input.reshape(-1).contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = ops.call_noisy_embedding(weight, ids, tok_mag, noise, mag, ops.as_int64(seed or 0), 0,
                                   seed is None, symmetric,
                                   -1 if padding_idx is None else padding_idx, backend,
                                   reference.round_to_dtype(embed_scale, weight.dtype))
    return out.view(out_shape)


# --------------------------------------------------------------------------------------
# NoisyTune
# --------------------------------------------------------------------------------------
def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _merged_std(local: torch.Tensor, mesh, placements) -> torch.Tensor:
    """Unbiased std of the whole DTensor: (count, mean, M2) of each shard, all-gathered over
    the mesh dims it is sharded on and merged (Chan et al.) in rank order, in float64: no
    sum-of-squares cancellation, and the same value on every rank."""
    import torch.distributed as dist
    x = local.detach().reshape(-1).to(torch.float64)
    n = float(x.numel())
    mean = x.mean() if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device)
    m2 = ((x - mean) ** 2).sum()
    stat = torch.stack([torch.tensor(n, dtype=torch.float64, device=x.device), mean, m2])
    for dim, placement in enumerate(placements):
        if not placement.is_shard():
            continue  # replicated along this mesh dim: every rank already holds the same
        group = mesh.get_group(dim)
        parts = [torch.empty_like(stat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, stat, group=group)
        n, mean, m2 = 0.0, torch.zeros((), dtype=torch.float64, device=x.device), stat[2] * 0
        for part in parts:
            nb, mb, m2b = float(part[0]), part[1], part[2]
            if nb == 0:
                continue
            total = n + nb
            delta = mb - mean
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta * delta * (n * nb / total)
            n = total
        stat = torch.stack([torch.tensor(n, dtype=torch.float64, device=x.device), mean, m2])
    n, m2 = float(stat[0]), stat[2]
    return torch.sqrt(m2 / (n - 1)) if n > 1 else torch.zeros_like(m2)


def _noisytune_dtensor_(t, lam: float, seed: int, start: int) -> None:
    """NoisyTune of a sharded parameter (FSDP2 / DTensor): the std of the full matrix and,
    for every element, the noise it would get unsharded. Runs the reference math on each
    shard (chunked), not a fused kernel."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if t.numel() < 2:
        return
    local = t.to_local()
    std = _merged_std(local, t.device_mesh, t.placements).to(local.device)
    if not bool(torch.isfinite(std)) or float(std) == 0.0:
        return
    _, global_offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    reference.noisytune_shard_(local, t.shape, global_offset, std, lam, seed=seed, start=start)

def _unique_tensors(model_or_parameters) -> List[torch.Tensor]:
    if isinstance(model_or_parameters, torch.nn.Module):
        tensors = [p for _, p in model_or_parameters.named_parameters()]  # tied: once
    elif isinstance(model_or_parameters, torch.Tensor):
        tensors = [model_or_parameters]
    else:
        try:
            tensors = list(model_or_parameters)
        except TypeError:
            raise TypeError("noisytune_ takes an nn.Module, a tensor or an iterable of tensors, "
                            f"got {type(model_or_parameters).__name__}") from None
    seen, unique = set(), []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"noisytune_ got a {type(t).__name__} among the tensors")
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique


@torch.no_grad()
def noisytune_(model_or_parameters: Union[torch.nn.Module, Iterable[torch.Tensor]],
               lam: float = 0.15, *, seed: Optional[int] = None,
               backend: str = "auto") -> Union[torch.nn.Module, List[torch.Tensor]]:
    """NoisyTune, in place: every tensor W += (U[0, 1) - 0.5) * lam * std(W).

    ``std`` is unbiased over the whole tensor, in float32; tensors with fewer than two
    elements, std 0 or non-finite std are left unchanged. Each tensor gets its own stretch of
    the Philox stream (see :mod:`fastnoise.reference`), so the result depends only on the seed
    and the order of the tensors. Returns what it was given.
    """
    lam = check_nonnegative("lam", lam)
    seed = check_seed(seed)
    tensors = _unique_tensors(model_or_parameters)
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"noisytune_ perturbs floating-point tensors, got {t.dtype}")
        if ops.capturing(t):
            raise RuntimeError("noisytune_ cannot be captured in a CUDA graph: it runs once, "
                               "before training (its tables are copied from the host)")
    total = sum((t.numel() + 3) // 4 for t in tensors)
    if seed is None:
        device = tensors[0].device if tensors else torch.device("cpu")
        seed, offset = draw_seed(device, total)
    else:
        offset = 0
    starts = reference.noisytune_offsets([t.numel() for t in tensors], offset)
    # one backend call per (device, dtype) group; non-contiguous tensors go through a copy
    groups = {}
    for t, start in zip(tensors, starts):
        if _is_dtensor(t):
            _noisytune_dtensor_(t, lam, seed, start)
            continue
        groups.setdefault((t.device, t.dtype), []).append((t, start))
    for (device, dtype), members in groups.items():
        resolve_backend(backend, device, dtype, op="noisytune")  # raise before touching any
        work = [t if t.is_contiguous() else t.contiguous() for t, _ in members]
        ops.apply_noisytune_(work, lam, ops.as_int64(seed),
                             [ops.as_int64(s) for _, s in members], backend)
        for (t, _), w in zip(members, work):
            if w is not t:
                t.copy_(w)
    return model_or_parameters
