"""Pure-PyTorch reference: the definition of every noise, every scale and every random draw.

Every backend (Triton, CUDA, C++ CPU) is tested against this file. It is written for
clarity, not speed, and runs on any device PyTorch runs on. The contract below is the one
statement of the rules; code elsewhere names its parts (C1 ... C5) and follows them. C4 is
the heart: which random number each element gets, and what noise and scale it makes.

C1. Errors found on the device
==============================
Ids out of range and invalid packing inputs are found by the kernels, never by reading data
back on the host. A kernel never reads out of bounds: the output row of a bad id is NaN (both
rows of a pair), and invalid packing makes the scale NaN. Each device has one int64 (4,)
error buffer (:mod:`fastnoise.errors`): ``[code, value, bound, 0]``, code 1 = bad token id
(value = the id, bound = V), 2 = invalid ``cu_seqlens``, 3 = negative ``position_ids``
(bound = the token count); the value fields are written first and the code last (atomic
exchanges on a GPU), and ids in range never touch it. The C++ CPU kernels raise on a bad id
at once instead. :mod:`fastnoise.errors` says when a record is reported.

C2. NoisyTune statistics and arithmetic
=======================================
``n = numel(W)``; ``std64`` is the unbiased standard deviation over the whole tensor computed
in float64 from the exact values (any stable algorithm: backends agree to float64 rounding).
float32/float16/bfloat16 tensors: ``s = float32(float32(lam) * float32(std64))`` and
``W = dtype(float32(W) + (u - 0.5) * s)``; float64 tensors: ``s = lam * std64`` and
``W = W + (float64(u) - 0.5) * s``, in float64. A tensor with ``n < 2``, or whose ``s`` is 0
or not finite, stays unchanged (the published snippet turns such tensors into NaN).

C3. The weight's gradient
=========================
``grad[v] = embed_scale * sum of the grad_out rows of the tokens with id v`` (a symmetric
pair's two halves summed first, per token), accumulated in float32 (float64 for float64
gradients) and returned in grad_out's dtype; zero for ``padding_idx`` and for ids no token
has. The backward of the backward is the gather of those rows.

C4. Randomness, noise values and scale
======================================
One counter-based Philox4x32-10 stream (Salmon et al., Random123) keyed by a 64-bit seed.
It is the same function as Triton's ``tl.randint4x``/``tl.philox``:

    key     = (k0, k1)          = (seed & 0xFFFFFFFF, seed >> 32)
    counter = (c0, c1, c2, c3)  = (ctr & 0xFFFFFFFF, ctr >> 32, 0, 0)
    philox4x32_10(counter, key) -> four uint32 words (w0, w1, w2, w3)

``ctr`` is a 64-bit counter (arithmetic mod 2**64). Each call of an op is given a pair
``(seed, offset)``; the counters it uses are ``offset + k`` for ``k`` in a range that starts
at 0, so two calls with the same seed but offsets ``o`` and ``o + used`` never share a draw.
A call with no seed draws one from torch's default generator of the device
(:func:`fastnoise.seeds.draw_seed`): on the CPU ``seed = torch.randint(0, 2**63 - 1, ())``
(the C++ op draws ``random64() % (2**63 - 1)`` from the same generator: the same value) with
offset 0; on CUDA the generator's Philox seed, and offset = its Philox offset / 4, which is
advanced by 4 per counter used. Under torch.distributed the drawn seed is XORed with
``rank * 0x9E3779B97F4A7C15`` (rank-distinct noise; :func:`fastnoise.set_rank_distinct_noise`).

Noisy embedding. The input ids, flattened in C order, are the token rows ``r = 0 .. N-1``;
the embedding dimension is ``d``; columns are ``j = 0 .. d-1``.

* uniform and gaussian: ``G = ceil(d / 4)`` counters per row. Element ``(r, j)`` uses
  counter ``offset + r * G + j // 4`` and word ``j % 4``. One Philox call feeds 4 elements.
* bernoulli (+-1): ``G = ceil(d / 128)`` counters per row. Element ``(r, j)`` uses counter
  ``offset + r * G + j // 128``, word ``(j % 128) // 32`` and bit ``j % 32`` (LSB = bit 0).
  One Philox call feeds 128 elements.
* A call uses ``N * G`` counters (:func:`counters_used`). With ``symmetric=True`` the
  pair ``e + n`` and ``e - n`` shares the same ``n``, so the count does not double.

NoisyTune. Tensors are taken in the order given (a module's parameters in
``named_parameters()`` order, each once). Tensor ``t`` starts at counter
``offset + sum(ceil(numel(s) / 4) for s before t)``; its flat (C-order) element ``i`` uses
counter ``start_t + i // 4`` and word ``i % 4``, as ``uniform01``. Skipped tensors still take
their counters, so the noise of a tensor depends only on its position.

Noise values. Words to numbers (float32 throughout, each operation rounded once, no fused
multiply-add):

* ``uniform01(w)``: ``v = w if w < 2**31 else (~w & 0x7FFFFFFF)``;
  ``u = float32(v) * float32(4.6566127342e-10)`` in [0, 1) (Triton's ``uint_to_uniform_float``).
* uniform noise ``xi = u * 2 - 1`` in (-1, 1).
* gaussian noise, Box-Muller on the pairs (w0, w1) and (w2, w3) (Triton's ``randn4x``):
  ``u_a = max(uniform01(w_a), 1e-7)``, ``th = 6.283185307179586 * uniform01(w_b)``,
  ``rad = sqrt(-2 * log(u_a))``, ``xi_a = rad * cos(th)``, ``xi_b = rad * sin(th)``.
  Backends may use faster log/sqrt/sin/cos: Gaussian noise agrees to ~1e-6, not bit for bit.
* bernoulli noise ``xi = 1 - 2 * bit`` (bit 0 -> +1, bit 1 -> -1).

Scale and output. ``mag = float32(alpha / sqrt(L * d))`` computed in float64 and rounded once
(0 when ``L * d == 0``). ``L`` is the padded length (last dim of the ids; 1 for a 0-d id); for packed
rows, each sequence's length (:func:`segment_starts`: sequences start at each row, and where
``position_ids`` is 0, or at ``cu_seqlens`` boundaries; empty sequences are allowed); with an
``attention_mask``, only nonzero mask entries count, and masked tokens and sequences of
length 0 get ``mag = 0`` (:func:`token_scale`). Invalid ``cu_seqlens`` (not rising from 0 to
the token count) or negative ``position_ids`` give every token ``mag = NaN`` (found on the
device, so no host sync; reported as C1 says). Output:
``out = dtype(float32(e) + float32(xi * mag))`` (and ``e - n`` for the second half of a
symmetric pair); float64 weights add in float64. A scaled embedding (Gemma: ``embed_scale``,
rounded to the weight's dtype through float32) first rounds ``e = dtype(e * embed_scale)``,
then adds the noise.

C5. Sharded NoisyTune
=====================
Sharded parameters pass the full tensor's ``std64`` (``stds``, one per tensor) instead of
computing it from their shard (C2); every element gets the counter and the noise it gets
unsharded (C4).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

__all__ = [
    "PHILOX_KEY_A", "PHILOX_KEY_B", "PHILOX_ROUND_A", "PHILOX_ROUND_B",
    "WORDS_PER_COUNTER", "ELEMENTS_PER_COUNTER", "counters_per_row", "counters_used",
    "philox4x32", "uniform01", "noise_words", "draw_noise", "noise_scale", "token_scale",
    "segment_starts",
    "noisy_embedding", "embedding_backward", "noisytune_offsets", "noisytune_",
    "uniform01_at", "noisytune_shard_", "noisytune_scale", "std64", "accumulation_dtype",
    "packing_is_valid",
]

M32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # largest float32 with (2**31 - 1) * scale < 1
GAUSSIAN_MIN_U = 1e-7
TWO_PI = 6.283185307179586

WORDS_PER_COUNTER = 4
#: noise elements fed by one Philox call, per noise kind
ELEMENTS_PER_COUNTER = {"uniform": 4, "gaussian": 4, "bernoulli": 128}
NOISE_KINDS = tuple(ELEMENTS_PER_COUNTER)


def counters_per_row(noise: str, d: int) -> int:
    """G: Philox counters used by one token row of width d."""
    per = ELEMENTS_PER_COUNTER[noise]
    return (d + per - 1) // per


def counters_used(noise: str, n_tokens: int, d: int) -> int:
    """Counters one noisy-embedding call consumes (the offset advance for the next call)."""
    return n_tokens * counters_per_row(noise, d)


# --------------------------------------------------------------------------------------
# Philox4x32-10 in int64 arithmetic (each value holds a uint32)
# --------------------------------------------------------------------------------------
def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product a * b; a is a 32-bit constant.

    Splits b into 16-bit halves so every intermediate stays below 2**49 (no int64 overflow).
    """
    p0 = a * (b & 0xFFFF)
    p1 = a * (b >> 16)
    t = (p0 >> 16) + p1  # a * b == t * 2**16 + (p0 & 0xFFFF)
    lo = ((t & 0xFFFF) << 16) | (p0 & 0xFFFF)
    hi = t >> 16
    return hi, lo


def philox4x32(seed: int, ctr_lo: torch.Tensor, ctr_hi: torch.Tensor,
               c2: Optional[torch.Tensor] = None, c3: Optional[torch.Tensor] = None):
    """Philox4x32-10 of counters (ctr_lo, ctr_hi, c2, c3) under the 64-bit key ``seed``.

    Counter words are int64 tensors holding uint32 values; returns four such tensors.
    """
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & M32, seed >> 32
    c0, c1 = ctr_lo, ctr_hi
    c2 = torch.zeros_like(c0) if c2 is None else c2
    c3 = torch.zeros_like(c0) if c3 is None else c3
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & M32
        k1 = (k1 + PHILOX_KEY_B) & M32
    return c0, c1, c2, c3


def _counters(offset: int, index: torch.Tensor):
    """(lo, hi) words of the 64-bit counters offset + index (index >= 0, int64)."""
    offset = int(offset) & ((1 << 64) - 1)
    s = (offset & M32) + (index & M32)
    lo = s & M32
    hi = ((offset >> 32) + (index >> 32) + (s >> 32)) & M32
    return lo, hi


def uniform01(w: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float32 in [0, 1), as Triton's uint_to_uniform_float."""
    v = torch.where(w >= (1 << 31), (~w) & 0x7FFFFFFF, w)
    return v.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=w.device)


def noise_words(seed: int, offset: int, n_counters: int, device=None) -> torch.Tensor:
    """The (n_counters, 4) Philox words of counters offset .. offset + n_counters - 1."""
    idx = torch.arange(n_counters, dtype=torch.int64, device=device)
    lo, hi = _counters(offset, idx)
    return torch.stack(philox4x32(seed, lo, hi), dim=-1)


def _box_muller(ua: torch.Tensor, ub: torch.Tensor):
    ua = torch.clamp_min(ua, torch.tensor(GAUSSIAN_MIN_U, dtype=torch.float32))
    th = torch.tensor(TWO_PI, dtype=torch.float32) * ub
    rad = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(ua))
    return rad * torch.cos(th), rad * torch.sin(th)


def draw_noise(noise: str, n_rows: int, d: int, seed: int, offset: int = 0,
               device=None) -> torch.Tensor:
    """The unscaled noise xi, float32 (n_rows, d), of the contract above."""
    if noise not in ELEMENTS_PER_COUNTER:
        raise ValueError(f"unknown noise kind {noise!r}; expected one of {NOISE_KINDS}")
    g = counters_per_row(noise, d)
    w = noise_words(seed, offset, n_rows * g, device).view(n_rows, g, 4)
    if noise == "bernoulli":
        shifts = torch.arange(32, dtype=torch.int64, device=w.device)
        bits = (w.unsqueeze(-1) >> shifts) & 1  # (n, g, word, bit)
        xi = (1 - 2 * bits).to(torch.float32).reshape(n_rows, g * 128)
    else:
        u = uniform01(w)
        if noise == "uniform":
            xi = u * 2.0 - 1.0
        else:
            n0, n1 = _box_muller(u[..., 0], u[..., 1])
            n2, n3 = _box_muller(u[..., 2], u[..., 3])
            xi = torch.stack([n0, n1, n2, n3], dim=-1)
        xi = xi.reshape(n_rows, g * 4)
    return xi[:, :d].contiguous()


# --------------------------------------------------------------------------------------
# Scale
# --------------------------------------------------------------------------------------
def noise_scale(alpha: float, length: int, d: int) -> float:
    """mag = alpha / sqrt(L * d), in float64 rounded once to float32 (0 when L * d == 0)."""
    if length <= 0 or d <= 0:
        return 0.0
    return round_to_float32(float(alpha) / math.sqrt(float(length) * float(d)))


#: (mantissa bits with the implicit one, frexp exponent of the smallest normal) per dtype
_FLOAT_FORMATS = {torch.float32: (24, -125), torch.bfloat16: (8, -125), torch.float16: (11, -13)}


def round_to_dtype(x: float, dtype: torch.dtype) -> float:
    """The value of ``torch.tensor(x, dtype=float64).to(dtype)``, in plain Python (traceable
    by torch.compile): round to nearest even, to float32 first, as torch does (so fp16 and
    bf16 round twice, exactly like a float32 buffer ``.to(dtype)``). No overflow handling."""
    if dtype == torch.float64 or x == 0.0 or not math.isfinite(x):
        return float(x)
    if dtype != torch.float32:
        x = _round_mantissa(x, *_FLOAT_FORMATS[torch.float32])
    return _round_mantissa(x, *_FLOAT_FORMATS[dtype])


def _round_mantissa(x: float, bits: int, min_exponent: int) -> float:
    if x == 0.0:
        return x
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    if exponent < min_exponent:  # subnormal: fewer mantissa bits
        bits -= min_exponent - exponent  # may go negative: rounds to 0 or the smallest
    return math.ldexp(round(mantissa * 2**bits), exponent - bits)


def round_to_float32(x: float) -> float:
    """The float32 nearest to x (ties to even)."""
    return round_to_dtype(x, torch.float32)


def segment_starts(n_tokens: int, seq_len: int, position_ids: Optional[torch.Tensor] = None,
                   cu_seqlens: Optional[torch.Tensor] = None,
                   device=None) -> torch.Tensor:
    """Bool (N,): where a sequence starts among the flat tokens. Without packing, at each row
    start (every ``seq_len`` tokens); with ``position_ids``, also wherever they are 0; with
    ``cu_seqlens``, where the segment changes (token t is in the last segment whose start is
    <= t, clamped to the valid range, so invalid boundaries never index out of bounds; empty
    segments hold no token)."""
    if cu_seqlens is not None:
        tokens = torch.arange(n_tokens, device=cu_seqlens.device, dtype=torch.int64)
        cu = cu_seqlens.to(torch.int64).contiguous()
        segments = (torch.searchsorted(cu, tokens, right=True) - 1).clamp_(
            0, max(cu.numel() - 2, 0))
        starts = torch.ones(n_tokens, dtype=torch.bool, device=cu.device)
        starts[1:] = segments[1:] != segments[:-1]
        return starts
    if position_ids is not None:
        device = position_ids.device
    starts = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    if position_ids is not None:
        starts |= position_ids.reshape(-1) == 0
    starts[::max(seq_len, 1)] = True
    return starts


def packing_is_valid(n_tokens: int, cu_seqlens: Optional[torch.Tensor] = None,
                     position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 0-d bool tensor on the device (no host sync): ``cu_seqlens`` rises from 0 to
    ``n_tokens`` without going down, and ``position_ids`` are >= 0."""
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int64)
        ok = (cu[0] == 0) & (cu[-1] == n_tokens)
        if cu.numel() > 1:
            ok = ok & (cu[1:] >= cu[:-1]).all()
        return ok
    if position_ids is not None and position_ids.numel():
        return (position_ids >= 0).all()
    return torch.ones((), dtype=torch.bool)


def token_scale(alpha: float, d: int, n_tokens: int, seq_len: int, *,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token float32 mag of the flat tokens (N,): ``alpha / sqrt(L * d)`` in float64,
    rounded once, with L the count of kept tokens of the token's sequence (sequences:
    :func:`segment_starts`; kept: every token, or the nonzero ``attention_mask`` entries).
    Masked tokens and sequences with L == 0 get 0. Invalid packing inputs
    (:func:`packing_is_valid`) make every entry NaN.

    Written with scans and gathers only (no scatter), so it needs no table sized by the
    data."""
    device = next((t.device for t in (attention_mask, position_ids, cu_seqlens)
                   if t is not None), None)
    starts = segment_starts(n_tokens, seq_len, position_ids, cu_seqlens, device)
    keep = (torch.ones(n_tokens, dtype=torch.bool, device=starts.device)
            if attention_mask is None else (attention_mask != 0).reshape(-1))
    index = torch.arange(n_tokens, device=starts.device)
    first = torch.cummax(torch.where(starts, index, 0), 0).values  # the sequence's first token
    after = torch.where(starts, index, n_tokens)  # the next sequence's first token, past t
    after = torch.cat([torch.cummin(after.flip(0), 0).values.flip(0)[1:],
                       torch.full((min(n_tokens, 1),), n_tokens, device=starts.device)])
    kept = torch.cat([torch.zeros(1, dtype=torch.int64, device=starts.device),
                      torch.cumsum(keep.to(torch.int64), 0)])  # kept[t] = kept tokens before t
    length = (kept[after] - kept[first]).to(torch.float64)
    mag = torch.where(keep & (length > 0), float(alpha) / torch.sqrt(length * float(d)),
                      torch.zeros((), dtype=torch.float64, device=starts.device))
    if position_ids is not None or cu_seqlens is not None:
        valid = packing_is_valid(n_tokens, cu_seqlens=cu_seqlens, position_ids=position_ids)
        mag = torch.where(valid.to(mag.device), mag,
                          torch.full((), math.nan, dtype=torch.float64, device=mag.device))
    return mag.to(torch.float32)


# --------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------
def noisy_embedding(ids: torch.Tensor, weight: torch.Tensor, *, noise: str,
                    mag: float = 0.0, tok_mag: Optional[torch.Tensor] = None,
                    seed: int = 0, offset: int = 0, symmetric: bool = False,
                    embed_scale: float = 1.0) -> torch.Tensor:
    """Forward of the fused op on flat ids (N,): returns (N, d), or (2N, d) when symmetric.

    ``tok_mag`` (N,) float32 overrides the scalar ``mag`` when given. ``embed_scale`` != 1
    (Gemma's sqrt(d), already rounded to the weight's dtype) scales the looked-up rows first,
    as the model's own embedding does, rounding the product to the weight's dtype:
    ``e = dtype(float32(row) * float32(embed_scale))``; the noise lands on that.
    """
    n, d = ids.numel(), weight.shape[1]
    rows = weight.index_select(0, ids.reshape(-1).long())
    # float32 math (float64 weights keep float64: the add must not lose their precision)
    e = rows.to(torch.promote_types(weight.dtype, torch.float32))
    if embed_scale != 1.0:
        e = (e * torch.tensor(embed_scale, dtype=e.dtype, device=e.device)).to(
            weight.dtype).to(e.dtype)
    xi = draw_noise(noise, n, d, seed, offset, device=weight.device)
    if tok_mag is None:
        scale = torch.tensor(mag, dtype=torch.float32, device=weight.device)
    else:
        scale = tok_mag.to(torch.float32).reshape(n, 1)
    noise_values = (xi * scale).to(e.dtype)
    out = torch.cat([e + noise_values, e - noise_values]) if symmetric else e + noise_values
    return out.to(weight.dtype)


def embedding_backward(grad_out: torch.Tensor, ids: torch.Tensor, num_weights: int, *,
                       padding_idx: Optional[int] = None, symmetric: bool = False,
                       embed_scale: float = 1.0) -> torch.Tensor:
    """Gradient of the weight from grad_out (N, d) or (2N, d) for a pair:
    ``embed_scale * sum of grad_out rows per id``, accumulated (and returned) in float32, or
    in float64 for a float64 ``grad_out``."""
    n = ids.numel()
    acc = accumulation_dtype(grad_out.dtype)
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(acc)
    if symmetric:
        g = g[:n] + g[n:]
    if embed_scale != 1.0:
        g = g * torch.tensor(embed_scale, dtype=acc, device=g.device)
    grad = torch.zeros(num_weights, g.shape[1], dtype=acc, device=g.device)
    grad.index_add_(0, ids.reshape(-1).long(), g)
    if padding_idx is not None:
        grad[padding_idx] = 0
    return grad


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/16-bit gradients and NoisyTune arithmetic, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def noisytune_scale(lam: float, std64: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """NoisyTune's ``s`` (a 0-d tensor in the arithmetic dtype) from the float64 std, or None
    when the tensor stays unchanged (s is 0 or not finite). A host read: the reference's."""
    if dtype == torch.float64:
        s = torch.tensor(float(lam), dtype=torch.float64) * std64.to(torch.float64).cpu()
    else:
        s = (torch.tensor(float(lam), dtype=torch.float32)
             * std64.to(torch.float64).cpu().to(torch.float32))
    if not bool(torch.isfinite(s)) or float(s) == 0.0:
        return None
    return s


def noisytune_offsets(numels: Sequence[int], offset: int = 0) -> list:
    """Start counter of each tensor: offset + sum of ceil(numel / 4) of those before it."""
    starts, at = [], int(offset)
    for numel in numels:
        starts.append(at & ((1 << 64) - 1))
        at += (int(numel) + 3) // 4
    return starts


def uniform01_at(seed: int, start: int, flat_index: torch.Tensor) -> torch.Tensor:
    """NoisyTune's u of the elements with these global flat indices (counter
    ``start + i // 4``, word ``i % 4``), for tensors seen one shard at a time."""
    lo, hi = _counters(start, flat_index // 4)
    words = torch.stack(philox4x32(seed, lo, hi), dim=-1)
    return uniform01(words.gather(-1, (flat_index % 4).unsqueeze(-1)).squeeze(-1))


@torch.no_grad()
def noisytune_shard_(local: torch.Tensor, global_shape: Sequence[int],
                     global_offset: Sequence[int], std: torch.Tensor, lam: float, *,
                     seed: int, start: int, chunk: int = 1 << 22) -> None:
    """NoisyTune of one shard (a box of the full tensor at ``global_offset``) in place, with
    the full tensor's float64 ``std``: each element gets the noise it gets unsharded."""
    if local.numel() == 0:
        return
    s = noisytune_scale(lam, std, local.dtype)
    if s is None:
        return
    strides = [1] * len(global_shape)
    for dim in range(len(global_shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * int(global_shape[dim + 1])
    # the global flat index of each local element, built one dim at a time
    flat = torch.zeros((), dtype=torch.int64, device=local.device)
    for dim, size in enumerate(local.shape):
        idx = (torch.arange(size, device=local.device) + int(global_offset[dim])) * strides[dim]
        flat = flat.unsqueeze(-1) + idx
    flat = flat.reshape(-1)
    acc = accumulation_dtype(local.dtype)
    s = s.to(local.device)
    view = local.view(-1) if local.is_contiguous() else None
    x = local.reshape(-1)
    out = torch.empty_like(x)
    for at in range(0, flat.numel(), chunk):
        part = slice(at, at + chunk)
        u = uniform01_at(seed, start, flat[part]).to(acc)
        out[part] = (x[part].to(acc) + (u - 0.5) * s).to(local.dtype)
    if view is not None:
        view.copy_(out)
    else:
        local.copy_(out.view(local.shape))


def std64(t: torch.Tensor) -> torch.Tensor:
    """The unbiased std of the whole tensor, in float64 (NoisyTune's statistic)."""
    return t.detach().reshape(-1).to(torch.float64).std()


@torch.no_grad()
def noisytune_(tensors: Iterable[torch.Tensor], lam: float, *, seed: int,
               offset: int = 0, stds: Optional[Sequence[float]] = None) -> None:
    """W += (u - 0.5) * lam * std(W) for each tensor, in place (the contract above).
    ``stds`` (float64 stds, one per tensor) replace the tensors' own statistics."""
    tensors = list(tensors)
    if stds is not None and len(stds) != len(tensors):
        raise ValueError(f"noisytune_: {len(tensors)} tensors but {len(stds)} stds")
    starts = noisytune_offsets([t.numel() for t in tensors], offset)
    for k, (t, start) in enumerate(zip(tensors, starts)):
        numel = t.numel()
        if numel < 2:
            continue
        std = std64(t) if stds is None else torch.tensor(float(stds[k]), dtype=torch.float64)
        s = noisytune_scale(lam, std, t.dtype)
        if s is None:
            continue
        acc = accumulation_dtype(t.dtype)
        x = t.detach().to(acc).reshape(-1)
        u = uniform01(noise_words(seed, start, (numel + 3) // 4, x.device)).reshape(-1)[:numel]
        t.copy_((x + (u.to(acc) - 0.5) * s.to(x.device)).reshape(t.shape).to(t.dtype))
