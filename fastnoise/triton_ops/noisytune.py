"""NoisyTune: W += (u - 0.5) * lam * std(W) for many tensors, in two multi-tensor launches.

Work is cut into chunks of CHUNK elements; the chunks of all tensors of one dtype form one
flat grid, and a program finds its tensor by binary search over the chunks' prefix sums in a
small int64 table (data_ptr, numel, start counter, first chunk), cast to a pointer of the
launch's dtype in-kernel. Mixed sizes share each launch; mixed dtypes (fp32/fp16/bf16) get
one pair of launches per dtype, so the dtype is a compile-time constant and each thread's
random words can be laid out like its 16-byte vectors of data (no shared-memory shuffle).

1. stats (contract C2): each chunk computes the float64 (mean, M2) of its elements shifted
   by the tensor's first element (the shift keeps sums small for tensors with a large mean),
   block by block with a two-pass block M2 and Chan's merge, from the exact element values,
   and stores them in a float64 partials buffer (2 a chunk: the only extra memory besides
   O(#tensors) tables). float32 statistics would overflow from a std of ~1e18 and miss the
   reference's std by float32 rounding.
   merge: one program per tensor (a launch of its own, after every partial is written: no
   arrival counter, no ordering between programs to get right; NoisyTune runs once per
   training run, so the extra launch costs nothing that matters) merges the tensor's partials
   in chunk order (float64, deterministic) into std64 and writes
   s = float32(float32(lam) * float32(std64)), or a skip flag (n < 2, s not finite or 0).
   Given ``stds`` (C5, e.g. a sharded tensor's global std), s is computed on the host by the
   same rule and these two launches are skipped.
2. perturb: each chunk draws its Philox words (counter start + i // 4, word i % 4) and adds
   (u - 0.5) * s in place.

Every launch runs under the tensors' device guard (see embedding.device_guard).
"""

import torch
import triton
import triton.language as tl

from .. import reference
from ..ops import as_int64
from .embedding import _group_values, _split64, device_guard

BLOCK = 1024  # elements a step (256 Philox counters)
ITERS = 32  # steps a chunk
CHUNK = BLOCK * ITERS
MERGE_BLOCK = 1024
_META = 4  # int64 fields a tensor: ptr, numel, start, first chunk
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _find_tensor(meta_ptr, pid, n_tensors, META: tl.constexpr):
    """The tensor k whose chunk range holds chunk ``pid``: largest k with first_chunk[k] <= pid."""
    lo = pid * 0
    hi = lo + n_tensors
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(meta_ptr + mid * META + 3)
        go_right = first <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _typed(ptr_i64, ty: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor's pointer, typed; ALIGNED (every tensor of the launch starts on 16 bytes)
    lets loads and stores of whole blocks use 16-byte vectors."""
    p = ptr_i64.to(tl.pointer_type(ty))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _load_typed(p, offs, full, numel):
    if full:
        x = tl.load(p + offs)
    else:
        x = tl.load(p + offs, mask=offs < numel, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_typed(p, offs, y, full, numel):
    if full:
        tl.store(p + offs, y.to(p.dtype.element_ty))
    else:
        tl.store(p + offs, y.to(p.dtype.element_ty), mask=offs < numel)


@triton.jit
def _load_f32(ptr_i64, offs, full, numel, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """x[offs] as float32; ``full`` (the whole block is inside the tensor) loads unmasked,
    which is what lets the load be vectorized (a mask on an unknown numel is per element)."""
    if DTYPE == 0:
        x = _load_typed(_typed(ptr_i64, tl.float32, ALIGNED), offs, full, numel)
    elif DTYPE == 1:
        x = _load_typed(_typed(ptr_i64, tl.float16, ALIGNED), offs, full, numel)
    else:
        x = _load_typed(_typed(ptr_i64, tl.bfloat16, ALIGNED), offs, full, numel)
    return x


@triton.jit
def _store_f32(ptr_i64, offs, y, full, numel, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """x[offs] = y rounded to the tensor's dtype (``full`` as for _load_f32)."""
    if DTYPE == 0:
        _store_typed(_typed(ptr_i64, tl.float32, ALIGNED), offs, y, full, numel)
    elif DTYPE == 1:
        _store_typed(_typed(ptr_i64, tl.float16, ALIGNED), offs, y, full, numel)
    else:
        _store_typed(_typed(ptr_i64, tl.bfloat16, ALIGNED), offs, y, full, numel)


@triton.jit
def _chunk_partials(partial_ptr, first, c0, n_chunks, numel, WITH_M2: tl.constexpr,
                    CHUNK: tl.constexpr, MERGE_BLOCK: tl.constexpr):
    """Chunks c0 .. c0 + MERGE_BLOCK of a tensor whose first chunk is ``first``: (in range,
    element count, mean, M2 if WITH_M2 else 0), float64."""
    cc = c0 + tl.arange(0, MERGE_BLOCK)
    cm = cc < n_chunks
    cnt = tl.minimum(numel - cc * CHUNK, CHUNK).to(tl.float64)
    pm = tl.load(partial_ptr + (first + cc) * 2, mask=cm, other=0.0)
    pm2 = pm * 0.0
    if WITH_M2:
        pm2 = tl.load(partial_ptr + (first + cc) * 2 + 1, mask=cm, other=0.0)
    return cm, cnt, pm, pm2


@triton.jit
def _noisytune_stats_kernel(meta_ptr, partial_ptr, n_tensors,
                            META: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                            DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """One chunk's float64 (mean, M2) of x - x[0], to partial_ptr[2 * chunk + 0/1]."""
    pid = tl.program_id(0).to(tl.int64)
    k = _find_tensor(meta_ptr, pid, n_tensors, META)
    ptr = tl.load(meta_ptr + k * META)
    numel = tl.load(meta_ptr + k * META + 1)
    first = tl.load(meta_ptr + k * META + 3)
    c = pid - first
    base = c * (BLOCK * ITERS)
    # shift by the tensor's first element: sums of x - shift stay small (no cancellation)
    two = tl.arange(0, 2)
    shift = tl.sum(_load_f32(ptr, two, False, 1, DTYPE, False).to(tl.float64))

    # float64 from the exact element values (C2): every fp32/fp16/bf16 value is exact in it
    n = tl.full([], 0.0, tl.float64)
    mean = n
    m2 = n
    steps = tl.cdiv(tl.minimum(numel - base, BLOCK * ITERS), BLOCK)
    for it in range(steps):
        at = base + it * BLOCK
        offs = at + tl.arange(0, BLOCK)
        mask = offs < numel
        full = at + BLOCK <= numel
        x = _load_f32(ptr, offs, full, numel, DTYPE, ALIGNED).to(tl.float64)
        y = tl.where(mask, x - shift, 0.0)
        cnt = tl.minimum(numel - at, BLOCK).to(tl.float64)
        bmean = tl.sum(y) / cnt
        dev = tl.where(mask, y - bmean, 0.0)
        bm2 = tl.sum(dev * dev)
        # Chan et al.: merge (cnt, bmean, bm2) into the running (n, mean, m2)
        tot = n + cnt
        delta = bmean - mean
        mean = mean + delta * (cnt / tot)
        m2 = m2 + bm2 + delta * delta * (n * cnt / tot)
        n = tot
    tl.store(partial_ptr + pid * 2, mean)
    tl.store(partial_ptr + pid * 2 + 1, m2)


@triton.jit
def _noisytune_merge_kernel(meta_ptr, partial_ptr, stats_ptr, lam,
                            META: tl.constexpr, CHUNK: tl.constexpr,
                            MERGE_BLOCK: tl.constexpr):
    """Program k: tensor k's partials, merged in chunk order (float64, deterministic), to
    stats_ptr[2 k] = s (C2) and stats_ptr[2 k + 1] = 1.0, or 0.0 to leave it unchanged."""
    k = tl.program_id(0).to(tl.int64)
    numel = tl.load(meta_ptr + k * META + 1)
    first = tl.load(meta_ptr + k * META + 3)
    n_chunks = tl.cdiv(numel, CHUNK)
    numel_f = numel.to(tl.float64)
    tot = tl.zeros([MERGE_BLOCK], dtype=tl.float64)
    for c0 in range(0, n_chunks, MERGE_BLOCK):
        cm, cnt, pm, _ = _chunk_partials(partial_ptr, first, c0, n_chunks, numel, False, CHUNK,
                                         MERGE_BLOCK)
        tot += tl.where(cm, cnt * pm, 0.0)
    gmean = tl.sum(tot) / numel_f
    acc = tl.zeros([MERGE_BLOCK], dtype=tl.float64)
    for c0 in range(0, n_chunks, MERGE_BLOCK):
        cm, cnt, pm, pm2 = _chunk_partials(partial_ptr, first, c0, n_chunks, numel, True, CHUNK,
                                           MERGE_BLOCK)
        dm = pm - gmean
        acc += tl.where(cm, pm2 + cnt * dm * dm, 0.0)
    var = tl.sum(acc) / tl.maximum(numel_f - 1.0, 1.0)  # numel < 2 is skipped below
    # C2: s = float32(float32(lam) * float32(std64)); lam arrives as float32
    s = lam * tl.sqrt(var).to(tl.float32)
    # skip numel < 2, s == 0 and non-finite s (NaN fails |s| <= FLT_MAX)
    ok = (numel >= 2) & (s != 0.0) & (tl.abs(s) <= 3.4028234663852886e38)
    tl.store(stats_ptr + k * 2, s)
    tl.store(stats_ptr + k * 2 + 1, ok.to(tl.float32))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _noisytune_perturb_kernel(meta_ptr, stats_ptr, n_tensors, seed_lo, seed_hi,
                              META: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                              DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    k = _find_tensor(meta_ptr, pid, n_tensors, META)
    ok = tl.load(stats_ptr + k * 2 + 1)
    if ok != 0.0:
        s = tl.load(stats_ptr + k * 2)
        ptr = tl.load(meta_ptr + k * META)
        numel = tl.load(meta_ptr + k * META + 1)
        start = tl.load(meta_ptr + k * META + 2).to(tl.uint64, bitcast=True)
        first = tl.load(meta_ptr + k * META + 3)
        base = (pid - first) * (BLOCK * ITERS)
        steps = tl.cdiv(tl.minimum(numel - base, BLOCK * ITERS), BLOCK)
        # a thread's random words cover whole 16-byte vectors (4 fp32 or 8 fp16/bf16
        # elements: 1 or 2 counters), laid out like the data (see _group_values)
        VEC: tl.constexpr = 4 if DTYPE == 0 else 8
        grp = tl.arange(0, BLOCK // VEC)[None, :]
        for it in range(steps):
            at = base + it * BLOCK  # a multiple of 8: its counters are start + at // 4 + c
            ctr = start + (at // 4 + (VEC // 4) * grp).to(tl.uint64)
            u = _group_values(ctr, seed_lo, seed_hi, 3, VEC // 4)  # U[0, 1), [1, BLOCK]
            offs = at + tl.arange(0, BLOCK)[None, :]
            full = at + BLOCK <= numel
            x = _load_f32(ptr, offs, full, numel, DTYPE, ALIGNED)
            y = x + (u - 0.5) * s  # fp fusion is off: rounded like the reference
            _store_f32(ptr, offs, y, full, numel, DTYPE, ALIGNED)


def noisytune_(tensors, lam, *, seed, starts, stds=None):
    """Perturb every tensor in place; tensor k draws from counter starts[k] on and, with
    ``stds`` (a float per tensor, C5), uses stds[k] as its std64. Three launches per (device,
    dtype) present (one with stds). Every tensor is checked before any is touched."""
    tensors = list(tensors)
    if len(starts) != len(tensors) or stds is not None and len(stds) != len(tensors):
        raise ValueError(f"noisytune_: {len(tensors)} tensors, {len(starts)} starts"
                         + ("" if stds is None else f", {len(stds)} stds"))
    groups = {}
    for k, (t, start) in enumerate(zip(tensors, starts)):
        if t.numel() == 0:
            continue
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"noisytune_: dtype {t.dtype} not supported by the triton backend "
                            "(float32, float16, bfloat16)")
        if not t.is_contiguous():
            raise ValueError("noisytune_: the triton backend needs contiguous tensors")
        std = None if stds is None else float(stds[k])
        groups.setdefault((t.device, t.dtype), []).append((t, start, std))
    seed_lo, seed_hi = _split64(seed)
    for (device, dtype), members in groups.items():
        with device_guard(device):
            _launch(device, members, float(lam), seed_lo, seed_hi, _DTYPE_CODES[dtype])


def _given_stats(lam, stds, numels):
    """(s, ok) float32 pairs for given std64s, by the reference's rule (C2,
    :func:`fastnoise.reference.noisytune_scale`): ok = n >= 2 and s finite and nonzero."""
    pairs = []
    for std, numel in zip(stds, numels):
        scale = reference.noisytune_scale(lam, torch.tensor(std, dtype=torch.float64),
                                          torch.float32)
        ok = scale is not None and numel >= 2
        pairs += [float(scale) if ok else 0.0, 1.0 if ok else 0.0]
    return torch.tensor(pairs, dtype=torch.float32)


def _launch(device, members, lam, seed_lo, seed_hi, dtype_code):
    rows, first = [], 0
    for t, start, _ in members:
        rows.append((t.data_ptr(), t.numel(), as_int64(start), first))
        first += triton.cdiv(t.numel(), CHUNK)
    meta = torch.tensor(rows, dtype=torch.int64).to(device)
    k = len(rows)
    # separate allocations start on 16 bytes; views at an odd offset take the scalar path
    aligned = all(row[0] % 16 == 0 for row in rows)
    if members[0][2] is not None:  # stds given (C5): no statistics pass
        stats = _given_stats(lam, [m[2] for m in members], [m[0].numel() for m in members])
        stats = stats.to(device)
    else:
        stats = torch.empty(k * 2, dtype=torch.float32, device=device)
        partials = torch.empty(first * 2, dtype=torch.float64, device=device)
        _noisytune_stats_kernel[(first,)](
            meta, partials, k,
            META=_META, BLOCK=BLOCK, ITERS=ITERS, DTYPE=dtype_code, ALIGNED=aligned,
            num_warps=4, enable_fp_fusion=False,
        )
        _noisytune_merge_kernel[(k,)](
            meta, partials, stats, lam,
            META=_META, CHUNK=CHUNK, MERGE_BLOCK=MERGE_BLOCK, num_warps=4,
            enable_fp_fusion=False,
        )
    _noisytune_perturb_kernel[(first,)](
        meta, stats, k, seed_lo, seed_hi,
        META=_META, BLOCK=BLOCK, ITERS=ITERS, DTYPE=dtype_code, ALIGNED=aligned, num_warps=4,
        enable_fp_fusion=False,
    )
