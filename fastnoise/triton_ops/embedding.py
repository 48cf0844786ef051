"""Fused noisy embedding: gather + Philox noise + scale + add in one pass, and its backward.

The noise follows the randomness contract of :mod:`fastnoise.reference` bit for bit (Gaussian
to ~1e-6): element (r, j) of a row of width d uses counter ``offset + r * G + j // PER``,
PER = 4 (uniform, gaussian: word j % 4) or 128 (bernoulli: word (j % 128) // 32, bit j % 32).

Why tiles of counters, not ``tl.rand`` on elements: one Philox call costs ~30 integer ops;
calling it once per element makes the kernel compute bound (~40% of copy bandwidth on an
H100). One call per 4 elements (uniform/gaussian) or per 128 elements (bernoulli, one bit
each) keeps it memory bound, so the noise is nearly free next to the gather.

Each thread builds the noise of whole 16-byte vectors of a row (VEC = 4 fp32 or 8 fp16/bf16
columns: 1 or 2 counters), joining the counters' words in registers in the order that
flattens to the columns (_group_values), so noise and data share a layout: 16-byte loads
and stores and no layout conversion through shared memory. (One counter a thread on fp16/bf16
rows had cost 8 KB of shared memory and 7 barriers a tile; tests/triton_compile_worker.py
reports both.)

``embed_scale`` != 1 (Gemma's scaled embedding) is the constexpr HAS_SCALE: the forward
rounds ``e = dtype(e * embed_scale)`` before the noise, the backward multiplies each fp32
grad row by it before accumulating; with HAS_SCALE off the kernels are the unscaled code.

SEED_FROM_PTR (a ``seed_tensor`` was given): the forward loads its 64-bit seed from an int64
device tensor instead of the seed_lo/seed_hi scalars, with counter offset 0, so a CUDA graph
captured around ``torch.randint`` + the forward draws fresh noise on every replay.

Out-of-range ids (< 0 or >= V: the frontend does not read ids back to check them) are never
read: the forward writes NaN over the whole row of such a token (both rows of a symmetric
pair), the backward kernels skip them. HAS_ERROR (an ``error`` buffer was given: the op
layer's device-side bad-id flag): the forward also records one bad id in it, with atomics
predicated on the bad rows, so good ids never touch the buffer.

Every launch runs under device_guard(the tensors' device): Triton launches on the current
device and that device's current stream, not the tensors'.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

NOISE_CODES = {"uniform": 0, "gaussian": 1, "bernoulli": 2}
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _u64(lo, hi):
    """64-bit unsigned from two i32 scalars holding its lo/hi words (bit patterns)."""
    lo = lo.to(tl.uint32, bitcast=True).to(tl.uint64)
    hi = hi.to(tl.uint32, bitcast=True).to(tl.uint64)
    return (hi << 32) | lo


@triton.jit
def _philox4x32(ctr, seed_lo, seed_hi):
    """Philox4x32-10 of the uint64 counters ``ctr`` -> four uint32 blocks (contract key/ctr).

    Same rounds as tl.philox_impl, but each 32x32 product is one widening multiply
    (IMAD.WIDE: hi and lo words at once) instead of a umulhi plus a mul: half the IMADs.
    """
    c0 = ctr.to(tl.uint32)  # truncates: the low word
    c1 = (ctr >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c2
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    for _ in tl.static_range(10):
        pa = c0.to(tl.uint64) * 0xD2511F53
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _uniform01(w):
    """Triton's uint_to_uniform_float: uint32 -> float32 in [0, 1)."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _sincos_0_2pi(th):
    """(sin, cos) of th in [0, 2pi), to ~1 ulp, in ~20 instructions for both.

    libdevice sinf/cosf each carry a general range reduction (and a Payne-Hanek slow path);
    here th < 2pi, so one Cody-Waite step by pi/2 (explicit FMAs) and two minimax
    polynomials on [-pi/4, pi/4] (musl's __sindf/__cosdf coefficients) suffice.
    """
    q = (th * 0.6366197723675814 + 0.5).to(tl.int32)  # nearest quadrant, th >= 0
    qf = q.to(tl.float32)
    r = tl.fma(qf, -1.5707963705062866, th)
    r = tl.fma(qf, 4.371139000186241e-08, r)
    z = r * r
    # Horner with explicit FMAs (fp fusion is off for the launch, so spell them out)
    ps = tl.fma(z, 2.718311493989822e-06, -1.9839334836096632e-04)
    ps = tl.fma(z, ps, 0.008333329385889463)
    ps = tl.fma(z, ps, -0.16666666641626524)
    s = tl.fma(r * z, ps, r)
    pc = tl.fma(z, 2.439044879627741e-05, -0.001388676377460993)
    pc = tl.fma(z, pc, 0.04166662332373906)
    pc = tl.fma(z, pc, -0.499999997251031)
    c = tl.fma(z, pc, 1.0)
    swap = (q & 1) != 0
    sv = tl.where(swap, c, s)
    cv = tl.where(swap, s, c)
    sv = tl.where((q & 2) != 0, -sv, sv)
    cv = tl.where(((q + 1) & 2) != 0, -cv, cv)
    return sv, cv


@triton.jit
def _box_muller(ua, ub):
    ua = tl.maximum(1.0e-7, ua)
    th = 6.283185307179586 * ub
    rad = tl.sqrt(-2.0 * tl.log(ua))
    sn, cs = _sincos_0_2pi(th)
    return rad * cs, rad * sn


@triton.jit
def _interleave4(a0, a1, a2, a3):
    """[T, C] (or [T, C, 2]) x 4 -> [T, 4 * C] (or [T, 8 * C]): a_i's value lands at column
    4c + i (8c + 4j + i for [T, C, 2] inputs), in the same thread's registers.

    join stacks along a new minor dim, so x = join(join(a0, a2), join(a1, a3)) has
    x[t, c, i, k] = (join(a0, a2) if k == 0 else join(a1, a3))[t, c, i] = a_{2i + k}; the
    reshape flattens (c, i, k) -> 4c + 2i + k: a0, a1, a2, a3 in order. (The naive
    join(join(a0, a1), join(a2, a3)) gives a0, a2, a1, a3; the tests check the order.)
    A [T, C, 2] input's own minor dim j is the slowest of the three: 8c + 4j + 2i + k.
    """
    x = tl.join(tl.join(a0, a2), tl.join(a1, a3))
    return tl.reshape(x, [a0.shape[0], a0.numel // a0.shape[0] * 4])


@triton.jit
def _counter_values(ctr, seed_lo, seed_hi, KIND: tl.constexpr):
    """The 4 values of each counter: U(-1, 1) (KIND 0, NEFTune), N(0, 1) (KIND 1) or
    U[0, 1) (KIND 3, NoisyTune); four tensors shaped like ``ctr``."""
    w0, w1, w2, w3 = _philox4x32(ctr, seed_lo, seed_hi)
    if KIND == 1:
        a0, a1 = _box_muller(_uniform01(w0), _uniform01(w1))
        a2, a3 = _box_muller(_uniform01(w2), _uniform01(w3))
    elif KIND == 3:
        a0, a1, a2, a3 = _uniform01(w0), _uniform01(w1), _uniform01(w2), _uniform01(w3)
    else:
        a0 = _uniform01(w0) * 2.0 - 1.0
        a1 = _uniform01(w1) * 2.0 - 1.0
        a2 = _uniform01(w2) * 2.0 - 1.0
        a3 = _uniform01(w3) * 2.0 - 1.0
    return a0, a1, a2, a3


@triton.jit
def _group_values(ctr, seed_lo, seed_hi, KIND: tl.constexpr, CPG: tl.constexpr):
    """[T, G] first counters -> [T, G * 4 * CPG] values: group g is counters ctr[g], ...,
    ctr[g] + CPG - 1 (1 or 2), 4 values each, in counter order, all in one thread's registers.

    Why: a 16-byte vector holds 4 fp32 or 8 fp16/bf16 elements, i.e. 1 or 2 counters. Joining
    the counter index first (the slowest minor dim, see _interleave4) gives the noise the
    data's layout: no trip through shared memory between them, on Triton 3.6 and 3.9 alike
    (tests/test_triton_compile.py checks it).
    """
    a0, a1, a2, a3 = _counter_values(ctr, seed_lo, seed_hi, KIND)
    if CPG == 2:
        b0, b1, b2, b3 = _counter_values(ctr + 1, seed_lo, seed_hi, KIND)
        a0, a1, a2, a3 = tl.join(a0, b0), tl.join(a1, b1), tl.join(a2, b2), tl.join(a3, b3)
    return _interleave4(a0, a1, a2, a3)


@triton.jit
def _noise_tile(rows, pid_d, d, seed_lo, seed_hi, off_lo, off_hi,
                NOISE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                VEC: tl.constexpr):
    """Unscaled noise xi, float32 [BLOCK_T, BLOCK_D], of token rows ``rows`` (int64) and
    columns pid_d * BLOCK_D + [0, BLOCK_D); VEC columns (one 16-byte vector of the rows) are
    built in one thread: VEC // 4 counters for uniform/Gaussian."""
    off = _u64(off_lo, off_hi)
    if NOISE == 2:
        # bernoulli: one counter per 128 columns, one bit per column
        NC: tl.constexpr = BLOCK_D // 128
        cidx = (pid_d * NC + tl.arange(0, NC)).to(tl.uint64)
        ctr = off + (rows.to(tl.uint64)[:, None] * ((d + 127) // 128) + cidx[None, :])
        w0, w1, w2, w3 = _philox4x32(ctr, seed_lo, seed_hi)
        words = _interleave4(w0, w1, w2, w3)  # [T, BLOCK_D // 32]
        words = tl.broadcast_to(words[:, :, None], [BLOCK_T, NC * 4, 32])
        shift = tl.arange(0, 32).to(tl.uint32)[None, None, :]
        bits = tl.reshape((words >> shift) & 1, [BLOCK_T, BLOCK_D])
        xi = 1.0 - 2.0 * bits.to(tl.float32)
    else:
        CPG: tl.constexpr = VEC // 4  # counters a group
        NG: tl.constexpr = BLOCK_D // VEC
        first = (pid_d * NG + tl.arange(0, NG)).to(tl.uint64) * CPG
        # uint64 * (i32 or constexpr d) promotes to uint64; the sum wraps mod 2**64
        ctr = off + (rows.to(tl.uint64)[:, None] * ((d + 3) // 4) + first[None, :])
        xi = _group_values(ctr, seed_lo, seed_hi, NOISE, CPG)
    return xi


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _noisy_embedding_fwd_kernel(
    ids_ptr, w_ptr, out_ptr, tok_mag_ptr, seed_ptr, error_ptr,
    N, V, d, w_row_stride, mag, embed_scale,
    seed_lo, seed_hi, off_lo, off_hi,
    NOISE: tl.constexpr, HAS_TOK_MAG: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_SCALE: tl.constexpr, SEED_FROM_PTR: tl.constexpr, HAS_ERROR: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < d)[None, :]

    # the frontend cannot check ids without a host sync: an out-of-range id is never read, and
    # its whole output row is NaN (never a silent clamp)
    ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    valid = (ids >= 0) & (ids < V)
    if HAS_ERROR:
        # C1: error[1] = a bad id, error[2] = V, then error[0] = 1, predicated per row on the
        # row being bad: good rows issue no memory traffic, and there is no reduction over
        # the tile (across warps it would need shared memory and a barrier)
        bad = row_mask & ~valid
        at = error_ptr + rows * 0
        tl.atomic_xchg(at + 1, ids, mask=bad, sem="relaxed")
        tl.atomic_xchg(at + 2, ids * 0 + V, mask=bad, sem="relaxed")
        tl.atomic_xchg(at, ids * 0 + 1, mask=bad, sem="release")
    ids = tl.where(valid, ids, 0)
    e = tl.load(w_ptr + ids[:, None] * w_row_stride + cols[None, :],
                mask=mask & valid[:, None], other=0.0)
    e = e.to(tl.float32)
    if HAS_SCALE:
        # Gemma: the row times embed_scale (fp32), rounded once to the weight dtype
        e = (e * embed_scale).to(w_ptr.dtype.element_ty).to(tl.float32)
    e = tl.where(valid[:, None], e, float("nan"))

    if SEED_FROM_PTR:
        # CUDA-graph-safe seed: the uint64 bits of an int64 device tensor, read at run time
        # (each graph replay sees the value drawn into it); the counter offset is 0
        s64 = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
        seed_lo = s64.to(tl.uint32)  # truncates: the low word
        seed_hi = (s64 >> 32).to(tl.uint32)

    xi = _noise_tile(rows, pid_d, d, seed_lo, seed_hi, off_lo, off_hi, NOISE, BLOCK_T, BLOCK_D,
                     VEC)
    if HAS_TOK_MAG:
        scale = tl.load(tok_mag_ptr + rows, mask=row_mask, other=0.0)[:, None]
    else:
        scale = mag
    n = xi * scale  # rounded once: the launch turns fp fusion off, so no FMA with the add

    out_offs = rows[:, None] * d + cols[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + out_offs, (e + n).to(ty), mask=mask)
    if SYMMETRIC:
        # the pair's second half reuses the same gathered row and the same draw
        tl.store(out_ptr + (rows[:, None] + N) * d + cols[None, :], (e - n).to(ty), mask=mask)


@triton.jit
def _embedding_bwd_atomic_kernel(
    grad_ptr, ids_ptr, out_ptr, N, V, d, padding_idx, embed_scale,
    SYMMETRIC: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """float32 grad only: atomics straight into the (V, d) result (no temporary)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = (cols < d)[None, :]
    ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    keep = row_mask & (ids >= 0) & (ids < V) & (ids != padding_idx)
    m2 = row_mask[:, None] & col_mask
    g = tl.load(grad_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0)
    g = g.to(tl.float32)
    if SYMMETRIC:
        g += tl.load(grad_ptr + (rows[:, None] + N) * d + cols[None, :], mask=m2,
                     other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * embed_scale
    tl.atomic_add(out_ptr + ids[:, None] * d + cols[None, :], g, mask=keep[:, None] & col_mask,
                  sem="relaxed")


@triton.jit
def _masked_by(mask, s):
    """Vector ``mask`` and scalar ``s``. (Not ``mask & s``: the interpreter gives int data for
    a vector & scalar of masks, which it then refuses as a mask.)"""
    return tl.where(s, mask, False)


@triton.jit
def _token_row(grad_ptr, perm_ptr, p, take, cols, col_mask, N, d, embed_scale,
               SYMMETRIC: tl.constexpr, HAS_SCALE: tl.constexpr):
    """float32 [BLOCK_D]: the grad row of the token at sorted position ``p`` (its pair's row
    added first, then times embed_scale: the reference's order); zero, with no load, where
    ``take`` (a scalar) is off."""
    r = tl.load(perm_ptr + p, mask=take, other=0)
    m = _masked_by(col_mask, take)
    g = tl.load(grad_ptr + r * d + cols, mask=m, other=0.0).to(tl.float32)
    if SYMMETRIC:
        g += tl.load(grad_ptr + (r + N) * d + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * embed_scale
    return g


@triton.jit
def _chunk_head(sorted_ids_ptr, c, N, CHUNK: tl.constexpr):
    """Of chunk c (sorted positions c * CHUNK ..): its first id, its length, the length of
    its first run in it, whether that run began in an earlier chunk (cut), and whether its
    last run goes on past it."""
    p0 = c * CHUNK
    q = tl.arange(0, CHUNK)
    m = p0 + q < N
    ids = tl.load(sorted_ids_ptr + p0 + q, mask=m, other=0).to(tl.int64)
    first_id = tl.load(sorted_ids_ptr + p0).to(tl.int64)
    length = tl.minimum(N - p0, CHUNK)
    head_len = tl.sum((m & (ids == first_id)).to(tl.int32))
    before = tl.load(sorted_ids_ptr + p0 - 1, mask=c > 0, other=0).to(tl.int64)
    head_cut = (c > 0) & (before == first_id)
    last_id = tl.load(sorted_ids_ptr + p0 + length - 1).to(tl.int64)
    more = p0 + CHUNK < N
    after = tl.load(sorted_ids_ptr + p0 + CHUNK, mask=more, other=0).to(tl.int64)
    tail_goes_on = more & (after == last_id)
    return first_id, length, head_len, head_cut, tail_goes_on


@triton.jit
def _chunk_token(grad_ptr, sorted_ids_ptr, perm_ptr, p0, j, length, skip, cols, col_mask, N, V,
                 d, padding_idx, embed_scale, SYMMETRIC: tl.constexpr,
                 HAS_SCALE: tl.constexpr):
    """Position j of the chunk at p0: its id, whether its row is summed here, and the row."""
    here = j < length
    tok = tl.load(sorted_ids_ptr + p0 + j, mask=here, other=0).to(tl.int64)
    take = here & (j >= skip) & (tok >= 0) & (tok < V) & (tok != padding_idx)
    g = _token_row(grad_ptr, perm_ptr, p0 + j, take, cols, col_mask, N, d, embed_scale,
                   SYMMETRIC, HAS_SCALE)
    return tok, take, g


@triton.jit
def _embedding_bwd_chunk_kernel(
    grad_ptr, sorted_ids_ptr, perm_ptr, out_ptr, partial_ptr, N, V, d, padding_idx,
    embed_scale,
    SYMMETRIC: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Sorted backward, step 1: program (c, column block) walks the CHUNK sorted positions of
    chunk c in order (unrolled, each row loaded 4 positions ahead: the row stores at run ends
    would otherwise hold back the next loads), summing each run of equal ids serially in
    fp32: the reference's order, so a run inside the chunk gets the reference's bits. A run
    * that began and ends in the chunk: its row is written here, once;
    * that goes on past the chunk: a long run (> CHUNK tokens) leaves this piece in
      partial[c] (a middle piece covers the whole chunk); a short one is left to the combine
      kernel of the next chunk (which sums it whole, in order);
    * that began in an earlier chunk and ends here: is left to the combine kernel (skipped)."""
    c = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    p0 = c * CHUNK
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    first_id, length, head_len, head_cut, tail_goes_on = _chunk_head(sorted_ids_ptr, c, N,
                                                                     CHUNK)
    middle_piece = (head_len == length) & tail_goes_on
    skip = tl.where(head_cut & (middle_piece == 0), head_len, 0)  # the combine's first run
    # the window: positions i .. i + 3
    t0, k0, g0 = _chunk_token(grad_ptr, sorted_ids_ptr, perm_ptr, p0, 0, length, skip, cols,
                              col_mask, N, V, d, padding_idx, embed_scale, SYMMETRIC, HAS_SCALE)
    t1, k1, g1 = _chunk_token(grad_ptr, sorted_ids_ptr, perm_ptr, p0, 1, length, skip, cols,
                              col_mask, N, V, d, padding_idx, embed_scale, SYMMETRIC, HAS_SCALE)
    t2, k2, g2 = _chunk_token(grad_ptr, sorted_ids_ptr, perm_ptr, p0, 2, length, skip, cols,
                              col_mask, N, V, d, padding_idx, embed_scale, SYMMETRIC, HAS_SCALE)
    t3, k3, g3 = _chunk_token(grad_ptr, sorted_ids_ptr, perm_ptr, p0, 3, length, skip, cols,
                              col_mask, N, V, d, padding_idx, embed_scale, SYMMETRIC, HAS_SCALE)
    acc = g0 + 0.0  # 0 + the first row, as the reference's zeroed sums (-0.0 -> +0.0)
    run_start = p0
    prev = t0
    for i in tl.static_range(CHUNK):
        p = p0 + i
        if i + 4 < CHUNK:
            t4, k4, g4 = _chunk_token(grad_ptr, sorted_ids_ptr, perm_ptr, p0, i + 4, length,
                                      skip, cols, col_mask, N, V, d, padding_idx, embed_scale,
                                      SYMMETRIC, HAS_SCALE)
        else:
            t4, k4, g4 = t3, k3, g3  # past the chunk: never used
        if i > 0:
            run_start = tl.where(t0 != prev, p, run_start)
            acc = tl.where(run_start == p, 0.0, acc) + g0
        run_end = k0 & ((p + 1 >= N) | (i == CHUNK - 1) | (t1 != t0))
        cut_tail = run_end & (i == length - 1) & tail_goes_on
        # goes on: a long run (its token CHUNK after its start has its id) -> partial
        far = run_start + CHUNK
        far_id = tl.load(sorted_ids_ptr + far, mask=cut_tail & (far < N), other=0).to(tl.int64)
        long_run = (far < N) & (far_id == t0)
        tl.store(out_ptr + t0 * d + cols, acc.to(out_ptr.dtype.element_ty),
                 mask=_masked_by(col_mask, run_end & (cut_tail == 0)))
        tl.store(partial_ptr + c * d + cols, acc, mask=_masked_by(col_mask, cut_tail & long_run))
        prev = t0
        t0, k0, g0 = t1, k1, g1
        t1, k1, g1 = t2, k2, g2
        t2, k2, g2 = t3, k3, g3
        t3, k3, g3 = t4, k4, g4


@triton.jit
def _embedding_bwd_combine_kernel(
    grad_ptr, sorted_ids_ptr, perm_ptr, out_ptr, partial_ptr, N, V, d, padding_idx,
    embed_scale,
    SYMMETRIC: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Sorted backward, step 2: program (c, column block) finishes the run that began before
    chunk c and ends in it: a short one (<= CHUNK tokens) summed whole in token order, a
    long one as the partials of its earlier chunks (in chunk order) plus its last piece.
    Other programs exit at once."""
    c = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    p0 = c * CHUNK
    first_id, length, head_len, head_cut, tail_goes_on = _chunk_head(sorted_ids_ptr, c, N,
                                                                     CHUNK)
    ends_here = head_cut & (((head_len == length) & tail_goes_on) == 0)
    valid = (first_id >= 0) & (first_id < V) & (first_id != padding_idx)
    if ends_here & valid:
        # the run's first position: the lower bound of first_id in sorted[0, p0)
        lo = p0 * 0
        hi = p0 - 1
        while lo < hi:
            mid = (lo + hi) // 2
            below = tl.load(sorted_ids_ptr + mid).to(tl.int64) < first_id
            lo = tl.where(below, mid + 1, lo)
            hi = tl.where(below, hi, mid)
        last = p0 + head_len - 1
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < d
        # short: all its rows (from chunks c - 1 and c) in token order; long: the partials of
        # its earlier chunks in chunk order, plus its piece in chunk c
        short = last - lo + 1 <= CHUNK
        start = tl.where(short, lo, p0)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in range(lo // CHUNK, tl.where(short, 0, c)):
            acc += tl.load(partial_ptr + k * d + cols, mask=col_mask, other=0.0)
        piece = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(CHUNK):
            take = start + i <= last
            g = _token_row(grad_ptr, perm_ptr, start + i, take, cols, col_mask, N, d,
                           embed_scale, SYMMETRIC, HAS_SCALE)
            piece = tl.where(take, piece + g, piece)
        acc = tl.where(short, piece, acc + piece)
        tl.store(out_ptr + first_id * d + cols, acc.to(out_ptr.dtype.element_ty),
                 mask=col_mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
_NO_GUARD = contextlib.nullcontext()
# torch's int-index guard (what torch.cuda.device wraps, without its argument parsing)
_CudaGuard = getattr(torch.cuda, "_DeviceGuard", torch.cuda.device)
# torch.cuda.current_device without its lazy-init check (a CUDA tensor exists: CUDA is up);
# absent from CPU-only builds, where no tensor is on CUDA
_cuda_current_device = getattr(torch._C, "_cuda_getDevice", lambda: -1)


def device_guard(device: torch.device):
    """Make ``device`` current around a launch. Triton launches on the current device and on
    its current stream (driver.active.get_current_device / get_current_stream(device)), not on
    the tensors': with them on cuda:1 while cuda:0 is current, an unguarded launch is an
    illegal memory access. The common case, the device already current, costs one C call and
    no guard object; CPU tensors (the interpreter) carry no device index: nothing to guard.
    (``device.index`` first: ``device.type`` builds a new string, ~10x slower.)"""
    index = device.index
    if index is None or index == _cuda_current_device() or device.type != "cuda":
        return _NO_GUARD
    return _CudaGuard(index)


def _i32(x: int) -> int:
    """A 32-bit word as a signed int, so Triton always types the scalar i32."""
    x &= _M32
    return x - (1 << 32) if x >= (1 << 31) else x


def _split64(x: int):
    """(lo, hi) i32 words of a 64-bit int (not cached: offsets change every call)."""
    return _i32(x), _i32(x >> 32)


@functools.lru_cache(maxsize=None)
def _block_d(d: int) -> int:
    # the largest of 1024..128 that wastes the fewest masked columns (d = 768 -> 256, 3 blocks)
    return min((1024, 512, 256, 128), key=lambda b: (triton.cdiv(d, b) * b, -b))


@functools.lru_cache(maxsize=4096)
def _fwd_config(n: int, d: int, noise: int):
    block_d = _block_d(d)
    # ~8K elements a tile (32 a thread at 8 warps); gaussian holds more live registers
    tile = 4096 if noise == 1 else 8192
    block_t = max(1, min(tile // block_d, triton.next_power_of_2(n)))
    num_warps = 8 if block_t * block_d >= 8192 else 4
    grid = (triton.cdiv(n, block_t), triton.cdiv(d, block_d))
    return block_t, block_d, num_warps, grid


#: sorted positions a program of the sorted backward sums at once (its chunk)
_CHUNK = 32


@functools.lru_cache(maxsize=4096)
def _bwd_config(n: int, d: int, atomic: bool):
    """(block_t, block_d, num_warps, grid): the atomic kernel tiles tokens; the sorted kernels
    run one program per (chunk of _CHUNK sorted positions, column block), block_t unused."""
    if atomic:
        block_d = min(_block_d(d), 512)
        block_t = max(1, min(4096 // block_d, triton.next_power_of_2(n)))
        return block_t, block_d, 4, (triton.cdiv(n, block_t), triton.cdiv(d, block_d))
    block_d = min(_block_d(d), 512)
    return 1, block_d, 4, (triton.cdiv(n, _CHUNK), triton.cdiv(d, block_d))


def noisy_embedding_forward(ids, weight, out, *, noise, mag, tok_mag, seed, offset, symmetric,
                            embed_scale=1.0, seed_tensor=None, error=None):
    """Write the noisy embedding of flat ids (N,) into out (N, d) or (2N, d) when symmetric.

    ``seed_tensor`` (int64, shape (1,), on the weight's device) overrides ``seed`` and makes
    the offset 0; the kernel loads it (no host sync), so it is safe under CUDA graph capture.
    Ids out of range give NaN rows (never read out of bounds); with ``error`` (int64, shape
    (4,), on the weight's device; contract C1) the kernel also records error[1] = one bad id,
    error[2] = V, then error[0] = 1, and leaves it untouched when every id is in range.
    """
    n = ids.shape[0]
    v, d = weight.shape
    code = NOISE_CODES[noise]
    block_t, block_d, num_warps, grid = _fwd_config(n, d, code)
    from_ptr = seed_tensor is not None
    if from_ptr:
        if seed_tensor.dtype != torch.int64 or seed_tensor.numel() != 1:
            raise ValueError("fastnoise: seed_tensor must be an int64 tensor of shape (1,), got "
                             f"{seed_tensor.dtype} {tuple(seed_tensor.shape)}")
        if seed_tensor.device != weight.device:
            raise ValueError(f"fastnoise: seed_tensor is on {seed_tensor.device}, the weight "
                             f"on {weight.device}")
        seed_lo = seed_hi = off_lo = off_hi = 0  # unused seed scalars; offset 0
    else:
        seed_lo, seed_hi = _split64(seed)
        off_lo, off_hi = _split64(offset)
    has_tok = tok_mag is not None
    has_error = error is not None
    with device_guard(weight.device):
        _noisy_embedding_fwd_kernel[grid](
            ids, weight, out, tok_mag if has_tok else ids, seed_tensor if from_ptr else ids,
            error if has_error else ids,
            n, v, d, weight.stride(0), float(mag), float(embed_scale),
            seed_lo, seed_hi, off_lo, off_hi,
            NOISE=code, HAS_TOK_MAG=has_tok, SYMMETRIC=bool(symmetric),
            HAS_SCALE=float(embed_scale) != 1.0, SEED_FROM_PTR=from_ptr, HAS_ERROR=has_error,
            BLOCK_T=block_t, BLOCK_D=block_d, VEC=16 // weight.element_size(),
            num_warps=num_warps, enable_fp_fusion=False,
        )
    return out


def embedding_backward(grad_out, ids, num_weights, *, padding_idx, symmetric, deterministic,
                       embed_scale=1.0):
    """Dense (num_weights, d) weight gradient, grad_out's dtype, accumulated in float32."""
    with device_guard(grad_out.device):
        return _embedding_backward(grad_out, ids, num_weights, padding_idx, symmetric,
                                   deterministic, embed_scale)


def _partials(rows, d, device):
    """The sorted backward's float32 partial sums (a chunk's piece of a run that goes on);
    each row read is written first."""
    return torch.empty(rows, d, dtype=torch.float32, device=device)


def _embedding_backward(grad_out, ids, num_weights, padding_idx, symmetric, deterministic,
                        embed_scale):
    n = ids.shape[0]
    d = grad_out.shape[-1]
    grad_out = grad_out.contiguous()
    out = torch.zeros(num_weights, d, dtype=grad_out.dtype, device=grad_out.device)
    if n == 0 or d == 0 or num_weights == 0:
        return out
    pad = -1 if padding_idx is None else int(padding_idx)
    if pad < 0 and padding_idx is not None:
        pad += num_weights
    has_scale = float(embed_scale) != 1.0
    if grad_out.dtype == torch.float32 and not deterministic:
        # extra memory: none (atomics straight into the result)
        block_t, block_d, num_warps, grid = _bwd_config(n, d, True)
        _embedding_bwd_atomic_kernel[grid](
            grad_out, ids, out, n, num_weights, d, pad, float(embed_scale),
            SYMMETRIC=bool(symmetric), HAS_SCALE=has_scale, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=num_warps, enable_fp_fusion=False,
        )
        return out
    # half-precision grads (or deterministic): sort, then fp32 sums of runs per chunk of
    # sorted positions, partial sums of runs across chunks combined in chunk order; each row
    # written once. Extra memory: the sort (ids' dtype + int64 positions: 12 or 16 N bytes,
    # plus torch.sort's O(N) workspace) and 4 d ceil(N / 32) bytes of partials; never (V, d).
    sorted_ids, perm = torch.sort(ids, stable=True)
    _, block_d, num_warps, grid = _bwd_config(n, d, False)
    partial = _partials(grid[0], d, grad_out.device)
    args = (grad_out, sorted_ids, perm, out, partial, n, num_weights, d, pad,
            float(embed_scale))
    meta = dict(SYMMETRIC=bool(symmetric), HAS_SCALE=has_scale, CHUNK=_CHUNK, BLOCK_D=block_d,
                num_warps=num_warps, enable_fp_fusion=False)
    _embedding_bwd_chunk_kernel[grid](*args, **meta)
    if grid[0] > 1:  # runs across chunks
        _embedding_bwd_combine_kernel[grid](*args, **meta)
    return out
