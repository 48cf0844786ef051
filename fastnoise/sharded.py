"""NoisyTune of parameters that no single process holds whole: FSDP2 / DTensor shards and
DeepSpeed ZeRO-3 partitions; and DeepSpeed's fp32 master copies of whole parameters.

The std is that of the full matrix: each rank's (count, mean, M2) of its own elements (no
padding), in float64, all-gathered and merged (Chan et al.) in rank order, so every rank gets
the same value. Every element gets the noise it would get unsharded: its global flat index
``g`` gives counter ``start_t + g // 4``, word ``g % 4``. So sharded and unsharded NoisyTune
give the same model.

Shards that are one contiguous flat range of the row-major tensor (a ZeRO-3 partition; a
DTensor sharded on dim 0 only) go through the fused kernels (``ops.apply_noisytune_`` with
the merged ``stds``, contract C5). A range whose global start is not a multiple of 4 shares
its first counter with the previous rank: its <= 3 leading elements are computed with the
reference (:func:`fastnoise.reference.noisytune_shard_`), the aligned rest by the kernel from
counter ``start_t + aligned_start // 4``. Other DTensor layouts (sharded on inner dims) run
the reference math on their box.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from . import ops, reference

__all__ = ["is_dtensor", "is_zero3", "logical_numel", "check_sharded", "noisytune_sharded_",
           "agree_on_seed", "sync_master_copy_"]


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def is_zero3(t) -> bool:
    """A DeepSpeed ZeRO-3 parameter (built under ``deepspeed.zero.Init`` or partitioned by
    ``deepspeed.initialize``): a placeholder whose values sit in ``ds_tensor``."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_numel")


def logical_numel(t: torch.Tensor) -> int:
    """Elements of the parameter as the model sees it (a ZeRO-3 placeholder holds none)."""
    return int(t.ds_numel) if is_zero3(t) else t.numel()


# --------------------------------------------------------------------------------------
# checks (before anything is changed)
# --------------------------------------------------------------------------------------
def _zero3_local(name: str, t) -> torch.Tensor:
    """The rank's flat partition of a ZeRO-3 parameter, after checking fastnoise can
    perturb it in place and the change sticks."""
    from deepspeed.runtime.zero.partition_parameters import (PartitionedParamStatus,
                                                             ZeroParamStatus)
    part = getattr(t, "ds_tensor", None)
    if part is None:
        raise ValueError(f"{name}: a ZeRO-3 parameter without its partition (ds_tensor is "
                         "None); it cannot be perturbed")
    if getattr(t, "ds_status", None) != ZeroParamStatus.NOT_AVAILABLE:
        raise RuntimeError(f"{name} is gathered ({t.ds_status}; inside GatheredParameters or "
                           "a forward): call noisytune_ outside it, on the partitions")
    if getattr(part, "status", None) != PartitionedParamStatus.AVAILABLE or \
            getattr(part, "final_location", None) is not None:
        raise ValueError(f"{name}: its ZeRO-3 partition is offloaded to NVMe; fastnoise "
                         "cannot perturb it there (offload to the CPU, or call noisytune_ "
                         "before deepspeed.initialize)")
    if getattr(t, "ds_secondary_tensor", None) is not None:
        raise ValueError(f"{name}: ZeRO++ hierarchical partitioning (zero_hpz_partition_size) "
                         "keeps a second copy that fastnoise would not update")
    if hasattr(part, "ds_quant_scale"):
        raise ValueError(f"{name}: its ZeRO-3 partition is quantized")
    if part.is_meta or part.dim() != 1 or part.numel() != int(part.ds_numel) or \
            not part.is_contiguous():
        raise ValueError(f"{name}: unexpected ZeRO-3 partition {tuple(part.shape)} "
                         f"(ds_numel {getattr(part, 'ds_numel', None)}); not perturbed")
    return part


def _dtensor_flat(t) -> bool:
    """Is each rank's local shard one contiguous flat range of the row-major tensor?"""
    from torch.distributed.tensor import Shard
    return all(type(p) is Shard and p.dim == 0 for p in t.placements if p.is_shard())


def check_sharded(name: str, t) -> Tuple[torch.device, torch.dtype]:
    """Raise a clear error if ``t`` (a DTensor or a ZeRO-3 parameter) cannot be perturbed;
    else the (device, dtype) of its local data (for the backend check)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name} is sharded but torch.distributed is not initialized")
    if is_dtensor(t):
        if any(p.is_partial() for p in t.placements):
            raise ValueError(f"{name}: a DTensor with a Partial placement holds no values "
                             "yet (reduce it first)")
        local = t.to_local()
    else:
        local = _zero3_local(name, t)
    return local.device, local.dtype


# --------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------
def _local_stats(x: torch.Tensor) -> torch.Tensor:
    """(count, mean, M2) of x's elements in float64 (two passes)."""
    x = x.detach().reshape(-1).to(torch.float64)
    if x.numel() == 0:
        return torch.zeros(3, dtype=torch.float64)
    mean = x.mean()
    m2 = ((x - mean) ** 2).sum()
    return torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), mean.cpu(),
                        m2.cpu()])


def _merge(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chan et al.'s merge of (count, mean, M2) rows, in the order given (float64)."""
    n, mean, m2 = 0.0, 0.0, 0.0
    for nb, mb, m2b in (p.tolist() for p in parts):
        if nb == 0:
            continue
        total = n + nb
        delta = mb - mean
        mean += delta * (nb / total)
        m2 += m2b + delta * delta * (n * nb / total)
        n = total
    return torch.tensor([n, mean, m2], dtype=torch.float64)


def _comm_device(group) -> torch.device:
    import torch.distributed as dist
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_merge(stats: torch.Tensor, group) -> torch.Tensor:
    """Merge the (k, 3) stat rows of every rank of ``group``: one all_gather for all k."""
    import torch.distributed as dist
    device = _comm_device(group)
    mine = stats.to(device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    parts = [p.cpu() for p in parts]
    return torch.stack([_merge([p[k] for p in parts]) for k in range(stats.shape[0])]) \
        if stats.shape[0] else stats


def _std64(stat: torch.Tensor) -> float:
    n, _, m2 = stat.tolist()
    return (m2 / (n - 1)) ** 0.5 if n > 1 else 0.0


# --------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------
class _Shard:
    """One sharded parameter: its local data and where that sits in the full tensor."""

    def __init__(self, name, t, start):
        self.name, self.param, self.start = name, t, start
        self.work = None  # the contiguous flat data the kernel perturbs (flat shards)
        self.numel = logical_numel(t)
        if is_dtensor(t):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
            self.local = t.to_local()
            _, self.global_offset = compute_local_shape_and_global_offset(
                t.shape, t.device_mesh, t.placements)
            self.groups = tuple(t.device_mesh.get_group(d) for d, p in enumerate(t.placements)
                                if p.is_shard())
            self.flat = _dtensor_flat(t)
            row = 1
            for size in t.shape[1:]:
                row *= int(size)
            self.flat_start = int(self.global_offset[0]) * row if t.dim() else 0
            self.valid = self.local.numel()
        else:  # ZeRO-3: rank r holds flat elements [r * size, (r + 1) * size), padded
            import torch.distributed as dist
            self.local = t.ds_tensor
            self.groups = (t.ds_process_group,)
            self.flat = True
            size = self.local.numel()
            self.flat_start = size * dist.get_rank(group=t.ds_process_group)
            self.valid = max(0, min(size, self.numel - self.flat_start))

    def values(self) -> torch.Tensor:
        """The local elements that belong to the tensor (no padding), flat if flat."""
        return self.local.reshape(-1)[:self.valid] if self.flat else self.local


def noisytune_sharded_(entries: Sequence[Tuple[str, torch.Tensor, int]], lam: float,
                       seed: int, backend: str) -> None:
    """NoisyTune of sharded parameters ``(name, tensor, start counter)`` (checked with
    :func:`check_sharded` first). Collective: every rank of each parameter's group calls it
    with the same parameters, seed and starts."""
    shards = [_Shard(name, t, start) for name, t, start in entries]
    # one all_gather per distinct chain of process groups, for all its parameters
    stds: List[float] = [0.0] * len(shards)
    by_groups = {}
    for k, sh in enumerate(shards):
        by_groups.setdefault(sh.groups, []).append(k)
    for groups, members in by_groups.items():
        stats = torch.stack([_local_stats(shards[k].values()) for k in members])
        for group in groups:
            stats = _all_merge(stats, group)
        for k, stat in zip(members, stats):
            stds[k] = _std64(stat)
    fused = {}  # (device, dtype) -> ([chunks], [starts], [stds])
    for sh, std in zip(shards, stds):
        if sh.numel < 2 or sh.valid == 0 or reference.noisytune_scale(
                lam, torch.tensor(std, dtype=torch.float64), sh.local.dtype) is None:
            continue
        std_t = torch.tensor(std, dtype=torch.float64, device=sh.local.device)
        if not sh.flat:
            reference.noisytune_shard_(sh.local, sh.param.shape, sh.global_offset, std_t, lam,
                                       seed=seed, start=sh.start)
            continue
        flat = sh.values()
        work = flat if flat.is_contiguous() else flat.contiguous()
        head = min((-sh.flat_start) % 4, sh.valid)
        if sh.valid - head < 4:  # too short for a kernel launch to matter: all reference
            head = sh.valid
        if head:
            reference.noisytune_shard_(work[:head], (sh.numel,), (sh.flat_start,), std_t, lam,
                                       seed=seed, start=sh.start)
        if head < sh.valid:
            chunks, starts, chunk_stds = fused.setdefault((work.device, work.dtype),
                                                          ([], [], []))
            chunks.append(work[head:])
            starts.append(sh.start + (sh.flat_start + head) // 4)
            chunk_stds.append(std)
        sh.work = work
    for chunks, starts, chunk_stds in fused.values():
        ops.apply_noisytune_(chunks, lam, ops.as_int64(seed),
                             [ops.as_int64(s) for s in starts], backend, chunk_stds)
    for sh in shards:
        if sh.work is not None and sh.work.data_ptr() != sh.values().data_ptr():
            sh.values().copy_(sh.work)
        sync_master_copy_(sh.param)


def agree_on_seed(seed: int, offset: int) -> Tuple[int, int]:
    """Rank 0's (seed, offset) on every rank: a drawn seed must be the same everywhere, or
    the shards of one parameter would get noise from different streams."""
    import torch.distributed as dist
    device = _comm_device(None)
    pair = torch.tensor([ops.as_int64(seed), ops.as_int64(offset)], dtype=torch.int64,
                        device=device)
    dist.broadcast(pair, src=0)
    seed, offset = pair.tolist()
    return ops.as_uint64(seed), ops.as_uint64(offset)


def sync_master_copy_(param) -> None:
    """After ``deepspeed.initialize`` the optimizer keeps an fp32 master copy of each
    trainable parameter (ZeRO-1/2/3, bf16) and writes it back after every step, which would
    erase the noise: give the master the perturbed values (its rank's part, no collective)."""
    if is_zero3(param):
        if getattr(param, "_z3_optimizer", None) is not None and param.requires_grad:
            param._z3_optimizer.set_local_hp_param(param.ds_tensor.to(torch.float32), param)
    elif getattr(param, "_hp_mapping", None) is not None:
        param.set_full_hp_param(param.detach().to(torch.float32))
