"""NoisyTune of parameters that no single process holds whole (FSDP2 / DTensor shards).

The std is that of the full matrix (shard statistics all-gathered and merged) and every
element gets the noise it would get unsharded, so sharded and unsharded NoisyTune give the
same model.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = ["is_dtensor", "noisytune_dtensor_"]


def is_dtensor(t) -> bool:
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


def noisytune_dtensor_(t, lam: float, seed: int, start: int) -> None:
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
