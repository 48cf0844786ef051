"""The per-token scale of a mask or packed rows (``reference.token_scale``, contract C4), in
Triton: the Triton backend's twin of csrc/cuda/token_scale_kernels.cuh, so a masked or
packed call is two launches instead of a dozen torch ops.

``mag[t] = float32(alpha / sqrt(L * d))`` in float64, L = the kept tokens of t's sequence;
masked tokens and sequences with L == 0 get 0; invalid packing makes every entry NaN and is
recorded in the error buffer (C1: ``[code, 0, n, 0]``, the code written last).

Rows (no packing, or position_ids): one program per row (a sequence never spans rows), chunks
of BLOCK tokens left to right. A scan gives each token the kept tokens up to it (K) and its
sequence's first token (F). A sequence's first token stores K before it in ``scratch[F]``;
after a barrier its last token turns that into the count; a second pass reads each token's
count through F (kept in ``first``). position_ids < 0 anywhere: every program sees it (each
scans them all) and writes NaN.
cu_seqlens: one program per BLOCK tokens; a token finds its sequence k by binary search; the
count is ``cu[k+1] - cu[k]``, or, with a mask, what one program per sequence counted first.
"""

import struct

import torch
import triton
import triton.language as tl

from .embedding import device_guard

BLOCK = 1024
NAN = float("nan")


@triton.jit
def _scale(alpha, count, d):
    """float32(alpha / sqrt(count * d)) in float64 (IEEE division and root), 0 for count 0."""
    safe = tl.maximum(count, 1).to(tl.float64)
    return tl.where(count > 0, (alpha / tl.sqrt(safe * d)).to(tl.float32), 0.0)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _record(error_ptr, code, n):
    # every thread writes the same values: the code last, once they are visible
    tl.atomic_xchg(error_ptr + 1, n * 0, sem="relaxed")
    tl.atomic_xchg(error_ptr + 2, n, sem="relaxed")
    tl.atomic_xchg(error_ptr, n * 0 + code, sem="release")


@triton.jit
def _kept(mask_ptr, t, m, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return (tl.load(mask_ptr + t, mask=m, other=0) != 0) & m
    else:
        return m


@triton.jit
def _token_scale_rows_kernel(mask_ptr, pos_ptr, mag_ptr, first_ptr, scratch_ptr, error_ptr,
                             n, row, d, alpha_bits,
                             HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr,
                             HAS_ERROR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * row
    e = b + row
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)
    offs = tl.arange(0, BLOCK)
    bad = pid * 0  # (loop variables below are named apart: Triton types each one once)
    if HAS_POS:
        for scan in range(0, n, BLOCK):
            i = scan + offs
            p = tl.load(pos_ptr + i, mask=i < n, other=0)
            bad = tl.maximum(bad, tl.max((p < 0).to(tl.int32), 0))
    if bad > 0:
        for fill in range(b, e, BLOCK):
            t = fill + offs
            tl.store(mag_ptr + t, tl.full([BLOCK], float("nan"), tl.float32), mask=t < e)
        if HAS_ERROR:
            if pid == 0:
                _record(error_ptr, 3, n)
    elif HAS_POS:
        # pass 1: K, F; the first token of a sequence parks K before it, the last turns it
        # into the sequence's count
        carry_k = b * 0
        carry_f = b
        for c1 in range(b, e, BLOCK):
            t = c1 + offs
            m = t < e
            kept = _kept(mask_ptr, t, m, HAS_MASK).to(tl.int64)
            p = tl.load(pos_ptr + t, mask=m, other=1)
            start = m & ((t == b) | (p == 0))
            k = tl.cumsum(kept, 0) + carry_k
            f = tl.associative_scan(tl.where(start, t, -1), 0, _max)
            f = tl.where(f < 0, carry_f, f)
            tl.store(first_ptr + t, f.to(tl.int32), mask=m)
            tl.store(scratch_ptr + t, (k - kept).to(tl.int32), mask=start)
            tl.debug_barrier()  # the starts' stores before the ends' loads
            after = tl.load(pos_ptr + t + 1, mask=m & (t + 1 < e), other=0)
            last = m & ((t + 1 == e) | (after == 0))
            before = tl.load(scratch_ptr + f, mask=last, other=0)
            tl.store(scratch_ptr + f, (k - before).to(tl.int32), mask=last)
            tl.debug_barrier()
            carry_k += tl.sum(kept, 0)
            carry_f = tl.maximum(carry_f, tl.max(tl.where(start, t, -1), 0))
        # pass 2: each token's sequence count
        for c2 in range(b, e, BLOCK):
            t = c2 + offs
            m = t < e
            f = tl.load(first_ptr + t, mask=m, other=0)
            count = tl.load(scratch_ptr + f, mask=m, other=0)
            kept = _kept(mask_ptr, t, m, HAS_MASK)
            tl.store(mag_ptr + t, tl.where(kept, _scale(alpha, count, d), 0.0), mask=m)
    else:
        # one sequence a row: count its kept tokens, then write
        count = b * 0
        for c3 in range(b, e, BLOCK):
            t = c3 + offs
            count += tl.sum(_kept(mask_ptr, t, t < e, HAS_MASK).to(tl.int64), 0)
        mag = _scale(alpha, count, d)
        for c4 in range(b, e, BLOCK):
            t = c4 + offs
            m = t < e
            tl.store(mag_ptr + t, tl.where(_kept(mask_ptr, t, m, HAS_MASK), mag, 0.0), mask=m)


@triton.jit
def _token_scale_cu_count_kernel(mask_ptr, cu_ptr, scratch_ptr, n, BLOCK: tl.constexpr):
    """scratch[k] = the kept tokens of sequence k (boundaries clamped to [0, n])."""
    k = tl.program_id(0)
    lo = tl.minimum(tl.maximum(tl.load(cu_ptr + k).to(tl.int64), 0), n)
    hi = tl.minimum(tl.maximum(tl.load(cu_ptr + k + 1).to(tl.int64), 0), n)
    offs = tl.arange(0, BLOCK)
    count = lo * 0
    for c in range(lo, hi, BLOCK):
        t = c + offs
        count += tl.sum((tl.load(mask_ptr + t, mask=t < hi, other=0) != 0).to(tl.int64), 0)
    tl.store(scratch_ptr + k, count.to(tl.int32))


@triton.jit
def _token_scale_cu_kernel(mask_ptr, cu_ptr, scratch_ptr, mag_ptr, error_ptr, n, cu_len, d,
                           alpha_bits, STEPS: tl.constexpr, HAS_MASK: tl.constexpr,
                           HAS_ERROR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)
    offs = tl.arange(0, BLOCK)
    # valid: rises from 0 to n without going down (every program checks all of it)
    first = tl.load(cu_ptr).to(tl.int64)
    final = tl.load(cu_ptr + cu_len - 1).to(tl.int64)
    bad = ((first != 0) | (final != n)).to(tl.int32)
    for c in range(1, cu_len, BLOCK):
        i = c + offs
        m = i < cu_len
        now = tl.load(cu_ptr + i, mask=m, other=0).to(tl.int64)
        prev = tl.load(cu_ptr + i - 1, mask=m, other=0).to(tl.int64)
        bad = tl.maximum(bad, tl.max((m & (now < prev)).to(tl.int32), 0))
    t = pid.to(tl.int64) * BLOCK + offs
    m = t < n
    # the last k with cu[k] <= t: the first k with cu[k] > t, minus one, clamped
    lo = t * 0
    hi = lo + cu_len
    for _ in tl.static_range(STEPS):
        open_ = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(cu_ptr + mid, mask=m & open_, other=0).to(tl.int64)
        right = open_ & (v <= t)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    k = tl.minimum(tl.maximum(lo - 1, 0), tl.maximum(cu_len - 2, 0))
    if HAS_MASK:
        count = tl.load(scratch_ptr + k, mask=m, other=0).to(tl.int64)
    else:
        count = (tl.load(cu_ptr + k + 1, mask=m, other=0).to(tl.int64)
                 - tl.load(cu_ptr + k, mask=m, other=0).to(tl.int64))
    kept = _kept(mask_ptr, t, m, HAS_MASK)
    mag = tl.where(kept, _scale(alpha, count, d), 0.0)
    mag = tl.where(bad > 0, float("nan"), mag)
    tl.store(mag_ptr + t, mag, mask=m)
    if HAS_ERROR:
        if bad > 0:
            if pid == 0:
                _record(error_ptr, 2, n)


def _bits(x: float) -> int:
    """The int64 bit pattern of a float64 (Triton types a Python float scalar as float32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def token_scale(alpha, d, n, row, attention_mask, position_ids, cu_seqlens, error=None):
    """float32 (n,) per-token scale on the inputs' device; ``error`` (int64 (4,), or None)
    records invalid packing inputs."""
    device = next(t.device for t in (attention_mask, position_ids, cu_seqlens) if t is not None)
    mag = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return mag
    mask = None if attention_mask is None else attention_mask.reshape(-1).contiguous()
    has_error = error is not None
    with device_guard(device):
        if cu_seqlens is not None:
            cu = cu_seqlens.contiguous()
            scratch = torch.empty(max(cu.numel(), 1), dtype=torch.int32, device=device)
            if mask is not None and cu.numel() > 1:
                _token_scale_cu_count_kernel[(cu.numel() - 1,)](mask, cu, scratch, n,
                                                               BLOCK=BLOCK)
            _token_scale_cu_kernel[(triton.cdiv(n, BLOCK),)](
                mask if mask is not None else cu, cu, scratch, mag,
                error if has_error else cu, n, cu.numel(), d, _bits(alpha),
                STEPS=cu.numel().bit_length() + 1, HAS_MASK=mask is not None,
                HAS_ERROR=has_error, BLOCK=BLOCK)
            return mag
        pos = None if position_ids is None else position_ids.reshape(-1).contiguous()
        scratch = torch.empty(2 * n if pos is not None else 1, dtype=torch.int32, device=device)
        block = min(BLOCK, triton.next_power_of_2(row))
        _token_scale_rows_kernel[(n // row,)](
            mask if mask is not None else mag, pos if pos is not None else mag, mag,
            scratch[n:] if pos is not None else scratch, scratch, error if has_error else mag,
            n, row, d, _bits(alpha), HAS_MASK=mask is not None, HAS_POS=pos is not None,
            HAS_ERROR=has_error, BLOCK=block)
    return mag
