"""NoisyTune's frontend: ``noisytune_(model_or_tensors, lam)``, selection, checks, seeds,
dispatch.

The math is :func:`fastnoise.reference.noisytune_`; the fused multi-tensor kernels live in
the backends; sharded parameters (FSDP2 / DTensor, DeepSpeed ZeRO-3) go through
:mod:`fastnoise.sharded`. Everything is checked before any tensor is touched, so an error
leaves every tensor as it was and a retry does not perturb anything twice.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from . import ops, reference
from .backends import resolve_backend
from .functional import check_nonnegative
from .seeds import check_seed, draw_seed
from . import sharded

__all__ = ["noisytune_", "selected_parameters", "unchanged_parameters"]

Patterns = Union[None, str, Sequence[str]]


def _named_tensors(model_or_parameters) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) of every distinct tensor, in order (tied parameters once)."""
    if isinstance(model_or_parameters, torch.nn.Module):
        named = list(model_or_parameters.named_parameters())  # tied: once
    elif isinstance(model_or_parameters, torch.Tensor):
        named = [("tensor", model_or_parameters)]
    else:
        try:
            named = [(f"tensors[{k}]", t) for k, t in enumerate(model_or_parameters)]
        except TypeError:
            raise TypeError("noisytune_ takes an nn.Module, a tensor or an iterable of tensors, "
                            f"got {type(model_or_parameters).__name__}") from None
    seen, unique = set(), []
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"noisytune_ got a {type(t).__name__} among the tensors ({name})")
        if id(t) not in seen:
            seen.add(id(t))
            unique.append((name, t))
    return unique


def check_patterns(what: str, patterns: Patterns) -> List[str]:
    """Glob patterns as a list (a str is one pattern); TypeError for anything else."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns) if isinstance(patterns, (list, tuple, set)) else [patterns]
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"noisytune_: {what} must be a glob pattern or a non-empty list of "
                        f"them, got {patterns!r}")
    return patterns


def _select(named, include: Patterns, exclude: Patterns, trainable_only: bool) -> List[bool]:
    include, exclude = check_patterns("include", include), check_patterns("exclude", exclude)
    names = [name for name, _ in named]
    unmatched = [p for p in include + exclude if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"noisytune_: no parameter name matches {unmatched} (names look like "
                         f"{names[:3]})")
    chosen = [(not include or any(fnmatchcase(name, p) for p in include))
              and not any(fnmatchcase(name, p) for p in exclude)
              and (not trainable_only or t.requires_grad) for name, t in named]
    if named and not any(chosen):
        raise ValueError("noisytune_: the selection (include / exclude / trainable_only) "
                         "leaves no parameter to perturb")
    return chosen


def selected_parameters(model_or_parameters, include: Patterns = None, exclude: Patterns = None,
                        trainable_only: bool = False) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) of what :func:`noisytune_` with this selection perturbs (each once)."""
    named = _named_tensors(model_or_parameters)
    chosen = _chosen(model_or_parameters, named, include, exclude, trainable_only)
    return [entry for entry, pick in zip(named, chosen) if pick]


def _chosen(model_or_parameters, named, include, exclude, trainable_only) -> List[bool]:
    if include is None and exclude is None and not trainable_only:
        return [True] * len(named)
    if not isinstance(model_or_parameters, torch.nn.Module):
        raise TypeError("noisytune_: include / exclude / trainable_only select parameters of "
                        "an nn.Module by name; with tensors, pass only the ones to perturb")
    return _select(named, include, exclude, bool(trainable_only))


def _fsdp1_sharded_units(model: torch.nn.Module) -> List[str]:
    """Names of FSDP1 (FullyShardedDataParallel) units whose parameters are sharded now."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return []
    units = []
    for name, module in model.named_modules():
        handle = getattr(module, "_handle", None) if isinstance(module, FSDP) else None
        if handle is None or not handle.uses_sharded_strategy:
            continue
        flat = handle.flat_param
        sharded_size = getattr(flat, "_sharded_size", None)
        full_size = getattr(flat, "_unpadded_unsharded_size", None)
        if sharded_size is None or full_size is None:
            units.append(name or type(model).__name__)  # an FSDP1 we do not know: refuse
        elif flat.numel() == sharded_size.numel() != full_size.numel():  # not summoned
            units.append(name or type(model).__name__)
    return units


def _check(name: str, t: torch.Tensor) -> Tuple[str, torch.device, torch.dtype]:
    """How ``t`` is perturbed ("dense" or "sharded") and the device and dtype its backend
    runs on; a clear error for anything fastnoise cannot perturb (never a silent no-op)."""
    if not t.is_floating_point():
        raise TypeError(f"noisytune_ perturbs floating-point tensors; {name} is {t.dtype}")
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:
        FlatParameter = ()
    if isinstance(t, FlatParameter):
        raise TypeError(f"{name} is an FSDP1 flat parameter (many parameters flattened and "
                        "sharded): call noisytune_ before wrapping, inside "
                        "FSDP.summon_full_params(model, writeback=True), or use FSDP2 "
                        "(fully_shard), whose DTensor parameters fastnoise perturbs")
    if sharded.is_dtensor(t) or sharded.is_zero3(t):
        device, dtype = sharded.check_sharded(name, t)
        return "sharded", device, dtype
    if hasattr(t, "ds_numel") or hasattr(t, "ds_shape"):
        raise ValueError(f"{name} carries DeepSpeed ZeRO attributes but is not a partitioned "
                         "ZeRO-3 parameter fastnoise recognizes; not perturbed")
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device (no values to perturb): materialize "
                         "it first (to_empty + load the weights)")
    if ops.capturing(t):
        raise RuntimeError("noisytune_ cannot be captured in a CUDA graph: it runs once, "
                           "before training (its tables are copied from the host)")
    return "dense", t.device, t.dtype


@torch.no_grad()
def noisytune_(model_or_parameters: Union[torch.nn.Module, Iterable[torch.Tensor]],
               lam: float = 0.15, *, seed: Optional[int] = None, backend: str = "auto",
               include: Patterns = None, exclude: Patterns = None,
               trainable_only: bool = False) -> Union[torch.nn.Module, List[torch.Tensor]]:
    """NoisyTune, in place: every tensor W += (U[0, 1) - 0.5) * lam * std(W).

    ``std`` is unbiased over the whole tensor (float64 statistics, contract C2 of
    :mod:`fastnoise.reference`); tensors with fewer than two elements, std 0 or a non-finite
    scale are left unchanged. Returns what it was given.

    Selection (an ``nn.Module`` only; with tensors it raises ``TypeError``): ``include`` and
    ``exclude`` are glob patterns (``fnmatch.fnmatchcase``: ``*``, ``?``, ``[...]``, case
    sensitive), a string or a list, matched against ``named_parameters()`` names; a parameter
    is perturbed if it matches some ``include`` pattern (all do when None), no ``exclude``
    pattern, and, with ``trainable_only``, has ``requires_grad``. A pattern that matches no
    name, or a selection that leaves nothing, raises ``ValueError``. E.g. skip a PEFT model's
    adapters with ``exclude="*lora_*"``, or ``trainable_only=True`` for only them.

    Random stream: tensor ``t`` of the full ``named_parameters()`` order (each tensor once)
    starts at counter ``offset + sum(ceil(numel(s) / 4) for s before t)``, with ``numel`` the
    full (unsharded) size. Parameters left out by the selection still take their counters,
    so the noise a parameter gets depends only on the seed and its position in the model,
    never on what else is selected.

    Sharded parameters (FSDP2 / DTensor, DeepSpeed ZeRO-3 partitions) are perturbed where
    they lie, without gathering: the std of the full matrix and, per element, the noise it
    gets unsharded (the call is collective). After
    ``deepspeed.initialize`` the optimizer's fp32 master copies get the perturbed values.
    A parameter fastnoise cannot perturb (an FSDP1 flat parameter, a meta tensor, a ZeRO-3
    partition offloaded to NVMe or gathered) raises an error naming it, before anything is
    changed.

    With ``seed=None`` and a torch.distributed process group of more than one rank, the
    seed is rank 0's on every rank (one broadcast: the call is collective), so replicas stay
    identical whatever each rank's torch seed.
    """
    lam = check_nonnegative("lam", lam)
    seed = check_seed(seed)
    named = _named_tensors(model_or_parameters)
    chosen = _chosen(model_or_parameters, named, include, exclude, trainable_only)
    if isinstance(model_or_parameters, torch.nn.Module):
        units = _fsdp1_sharded_units(model_or_parameters)
        if units:
            raise TypeError(f"noisytune_ cannot perturb FSDP1 (FullyShardedDataParallel) "
                            f"units {units[:3]}: their parameters are sharded flat views. "
                            "Call it before wrapping, inside FSDP.summon_full_params(model, "
                            "writeback=True), or use FSDP2 (fully_shard)")
    # every check before any tensor changes: kinds, dtypes, capture, and the backend of every
    # (device, dtype) the kernels will run on
    starts = reference.noisytune_offsets([sharded.logical_numel(t) for _, t in named])
    dense, sharded_entries, need = [], [], set()
    for (name, t), start, pick in zip(named, starts, chosen):
        if not pick:
            continue
        kind, device, dtype = _check(name, t)
        (dense if kind == "dense" else sharded_entries).append((name, t, start))
        need.add((device, dtype))
    for device, dtype in need:
        resolve_backend(backend, device, dtype, op="noisytune")
    total = starts[-1] + (sharded.logical_numel(named[-1][1]) + 3) // 4 if named else 0
    if seed is None:
        device = named[0][1].device if named else torch.device("cpu")
        if sharded_entries:
            device = sharded.check_sharded(*sharded_entries[0][:2])[0]
        seed, offset = draw_seed(device, total)
        if sharded_entries or _several_ranks():  # replicas and shards share one stream
            seed, offset = sharded.agree_on_seed(seed, offset)
    else:
        offset = 0
    offset_of = lambda start: (start + offset) % (1 << 64)  # noqa: E731
    if sharded_entries:
        sharded.noisytune_sharded_([(n, t, offset_of(s)) for n, t, s in sharded_entries],
                                   lam, seed, backend)
    # one backend call per (device, dtype) group; non-contiguous tensors go through a copy
    groups = {}
    for name, t, start in dense:
        groups.setdefault((t.device, t.dtype), []).append((t, offset_of(start)))
    for members in groups.values():
        work = [t if t.is_contiguous() else t.contiguous() for t, _ in members]
        ops.apply_noisytune_(work, lam, ops.as_int64(seed),
                             [ops.as_int64(s) for _, s in members], backend)
        for (t, _), w in zip(members, work):
            if w is not t:
                t.copy_(w)
            sharded.sync_master_copy_(t)
    return model_or_parameters


def _several_ranks() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unchanged_parameters(model_or_parameters, lam: float, include: Patterns = None,
                         exclude: Patterns = None,
                         trainable_only: bool = False) -> List[Tuple[str, str]]:
    """(name, why) of each selected tensor :func:`noisytune_` leaves unchanged, read before
    it runs: ``"numel < 2"``, ``"std 0"`` (every element equal, e.g. RMSNorm weights at
    init), ``"not finite"`` (a NaN or inf element) or ``"lam 0"``. Read from each tensor's min
    and max (no float64 copy); a tensor whose range is extreme gets the reference's exact
    rule. Collective for sharded parameters (min and max over the shards), as noisytune_."""
    lam = check_nonnegative("lam", lam)
    unchanged = []
    for name, t in selected_parameters(model_or_parameters, include, exclude, trainable_only):
        numel = sharded.logical_numel(t)
        if numel < 2:
            unchanged.append((name, "numel < 2"))
            continue
        lo, hi, finite = _range(name, t)
        if not finite:
            unchanged.append((name, "not finite"))
        elif lo == hi:
            unchanged.append((name, "std 0"))
        elif lam == 0:
            unchanged.append((name, "lam 0"))
        elif not 1e-30 < lam * (hi - lo) < 1e30 and not (sharded.is_dtensor(t)
                                                           or sharded.is_zero3(t)):
            # where float32's s could round to 0 or overflow: the reference's rule itself
            if reference.noisytune_scale(lam, reference.std64(t), t.dtype) is None:
                unchanged.append((name, "std 0"))
    return unchanged


def _range(name: str, t: torch.Tensor) -> Tuple[float, float, bool]:
    """(min, max, all finite) of a tensor's elements; of the full tensor when sharded."""
    if sharded.is_dtensor(t) or sharded.is_zero3(t):
        sharded.check_sharded(name, t)
        shard = sharded._Shard(name, t, 0)
        values, groups = shard.values(), shard.groups
    else:
        values, groups = t.detach(), ()
    lo, hi, bad = math.inf, -math.inf, 0.0  # an empty shard: neutral for the reductions
    if values.numel():
        lo, hi = (float(v) for v in torch.aminmax(values.reshape(-1)))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            lo, hi, bad = math.inf, -math.inf, 1.0
    if groups:
        import torch.distributed as dist
        for group in groups:
            stat = torch.tensor([-lo, hi, bad], dtype=torch.float64,
                                device=sharded._comm_device(group))
            dist.all_reduce(stat, op=dist.ReduceOp.MAX, group=group)
            lo, hi, bad = -float(stat[0]), float(stat[1]), float(stat[2])
    return lo, hi, not bad
