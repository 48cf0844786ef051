"""NoisyTune's frontend: ``noisytune_(model_or_tensors, lam)``, checks, seeds, dispatch.

The math is :func:`fastnoise.reference.noisytune_`; the fused multi-tensor kernels live in
the backends; sharded parameters go through :mod:`fastnoise.sharded`.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Union

import torch

from . import ops, reference
from .backends import resolve_backend
from .functional import check_nonnegative
from .seeds import check_seed, draw_seed
from .sharded import is_dtensor, noisytune_dtensor_

__all__ = ["noisytune_"]


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
        if is_dtensor(t):
            noisytune_dtensor_(t, lam, seed, start)
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
