"""Seeds: which (seed, offset) a call's Philox stream uses, drawn from torch's generators.

Layers read one way: reference -> backends -> seeds -> ops -> functional -> modules ->
integrations. The ops draw their seeds here (also inside compiled graphs); the functional
frontends check user seeds here.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

__all__ = ["check_seed", "set_rank_distinct_noise", "rank_seed_mask", "draw_seed"]

_U64 = 1 << 64


def check_seed(seed) -> Optional[int]:
    """None, or a 64-bit seed: anything ``operator.index`` takes (int, numpy integers), in
    [0, 2**64)."""
    if seed is None:
        return None
    # a tensor would be read back to the host (a device sync): pass a Python/NumPy integer
    if isinstance(seed, (bool, torch.Tensor)) or not hasattr(type(seed), "__index__"):
        raise TypeError(f"seed must be an integer or None, got {type(seed).__name__}")
    seed = operator.index(seed)
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


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
    if _RANK_DISTINCT[0] and _dist_initialized():
        mask = (torch.distributed.get_rank() * 0x9E3779B97F4A7C15) % _U64  # golden ratio, odd
        return mask - _U64 if mask >= 1 << 63 else mask  # int64 bits: what the ops take
    return 0


# every seed-drawing call asks this (~0.1 us); False where torch has no distributed support
_dist_initialized = (torch.distributed.is_initialized if torch.distributed.is_available()
                     else (lambda: False))


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
        seed ^= rank_seed_mask() % _U64
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
