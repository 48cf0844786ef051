"""``python -m fastnoise check``: validate every backend available here against the reference.

First prints what was built (:func:`fastnoise.build_info`: the compiled backends, CUDA
archs, torch, compilers and flags, and why anything is missing) and why each backend that
cannot run here is absent.

For each backend x op x noise kind x dtype: compare with :mod:`fastnoise.reference` on fresh
random inputs (bit-exact where the randomness contract says so, a tolerance otherwise) and
run the statistical checks of :mod:`fastnoise.stats`. Prints one table; exit status 1 on any
failure.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from . import reference, stats
from .backends import BACKEND_NAMES, available_backends, get_backend
from .build import format_build_info
from .functional import noisy_embedding
from .noisytune import noisytune_

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NOISES = reference.NOISE_KINDS

# Known answers of Philox4x32-10 (Random123's kat_vectors): counter, key, result
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@dataclass
class Row:
    backend: str
    op: str
    dtype: str
    max_error: Optional[float]
    status: str  # "ok", "FAIL", "skip"
    detail: str = ""


def _poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def check_philox() -> Row:
    bad = []
    for ctr, key, expect in PHILOX_KAT:
        words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
        got = reference.philox4x32(key[0] | (key[1] << 32), *words)
        if tuple(int(w) for w in got) != expect:
            bad.append(hex(ctr[0]))
    return Row("reference", "philox4x32-10 KAT", "-", None, "FAIL" if bad else "ok",
               f"mismatch at counters {bad}" if bad else "3 Random123 known answers")


def _forward_error(backend: str, noise: str, dtype, device) -> float:
    """Largest |backend - reference| over plain, symmetric and masked calls on fresh inputs;
    in units of mag for gaussian (which may differ by rounding), exact otherwise."""
    worst = 0.0
    for batch, length, d, vocab, symmetric, packing in [(3, 37, 100, 211, False, None),
                                                        (2, 5, 260, 97, True, None),
                                                        (4, 9, 33, 50, False, "mask"),
                                                        (2, 12, 40, 61, False, "positions"),
                                                        (1, 15, 24, 30, True, "cu")]:
        weight = torch.randn(vocab, d, device=device).to(dtype)
        ids = torch.randint(0, vocab, (batch, length), device=device)
        mask = ((torch.rand(batch, length, device=device) > 0.3).long()
                if packing == "mask" else None)
        # packed rows: sequences of 3, 5, 4 tokens (positions restart at 0), or boundaries
        pos = (torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3], device=device).repeat(batch, 1)
               if packing == "positions" else None)
        cu = (torch.tensor([0, 4, 4, 11, 15], dtype=torch.int32, device=device)
              if packing == "cu" else None)
        seed = int(torch.randint(0, 2**62, ()))
        alpha = 5.0
        got = noisy_embedding(ids, weight, noise=noise, alpha=alpha, symmetric=symmetric,
                              attention_mask=mask, position_ids=pos, cu_seqlens=cu, seed=seed,
                              backend=backend)
        tok_mag = None if packing is None else reference.token_scale(
            alpha, d, ids.numel(), length, attention_mask=mask, position_ids=pos, cu_seqlens=cu)
        mag = reference.noise_scale(alpha, length, d)
        want = reference.noisy_embedding(ids.reshape(-1), weight, noise=noise, mag=mag,
                                         tok_mag=tok_mag, seed=seed, symmetric=symmetric)
        got = got.reshape(want.shape).float()
        want = want.float()
        if got.isnan().any():
            return math.inf
        err = (got - want).abs()
        if noise == "gaussian":
            # allow ~1e-6 relative on the noise plus one rounding step of the output dtype
            ulp = torch.finfo(dtype).eps * want.abs()
            err = torch.clamp(err - ulp, min=0) / mag
        worst = max(worst, float(err.max()))
    return worst


def _stats_row(backend: str, noise: str, device) -> Row:
    """Statistics of the backend's own noise at a fixed seed (fp32, mag = 1)."""
    n_tok, d = 64, 1024
    gen = torch.Generator().manual_seed(1234)
    weight = (torch.randn(300, d, generator=gen) * 1e-3).to(device)
    ids = torch.randint(0, 300, (n_tok,), generator=gen).to(device)
    alpha = math.sqrt(n_tok * d)  # mag = alpha / sqrt(L * d) = 1
    out = noisy_embedding(ids, weight, noise=noise, alpha=alpha, seed=20261123, backend=backend)
    xi = (out.double() - weight[ids].double()).cpu()
    if noise == "bernoulli":
        near = (xi.abs() - 1).abs().max()
        if float(near) > 1e-3:
            return Row(backend, f"stats/{noise}", "float32", float(near), "FAIL",
                       "noise is not +-mag")
        xi = xi.sign()
    s = stats.check_noise_samples(noise, xi)
    detail = f"n={s.n} mean={s.mean:+.4f} var={s.var:.4f}" + (f" KS={s.ks:.4f}" if s.ks else "")
    if s.problems:
        detail = "; ".join(s.problems)
    return Row(backend, f"stats/{noise}", "float32", None, "ok" if s.ok else "FAIL", detail)


def _backward_row(backend: str, dtype, device) -> Row:
    vocab, d, n = 77, 130, 300
    weight = torch.randn(vocab, d, device=device).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, (3, n // 3), device=device)
    grad = torch.randn(6, n // 3, d, device=device).to(dtype)
    out = noisy_embedding(ids, weight, noise="bernoulli", symmetric=True, padding_idx=3,
                          seed=7, backend=backend)
    out.backward(grad)
    want = reference.embedding_backward(grad.float(), ids, vocab, padding_idx=3, symmetric=True)
    err = float((weight.grad.float() - want).abs().max())
    # flash-attention's rule: at most twice the error of same-dtype PyTorch, plus a hair
    w2 = weight.detach().clone().requires_grad_()
    torch.cat([torch.nn.functional.embedding(ids, w2, padding_idx=3)] * 2).backward(grad)
    base = float((w2.grad.float() - want).abs().max())
    tol = 2 * base + 1e-5 * float(want.abs().max())
    return Row(backend, "backward", str(dtype).replace("torch.", ""), err,
               "ok" if err <= tol else "FAIL", f"tol {tol:.2e} (2x same-dtype torch)")


def _noisytune_row(backend: str, dtype, device) -> Row:
    shapes = [(64, 33), (1000,), (7, 3, 5), (1,), (17,)]
    tensors = [torch.randn(s, device=device).to(dtype) for s in shapes]
    tensors[2] = (tensors[2].float() * 1e-2 + 100).to(dtype)  # large mean, small spread
    tensors[4] = torch.full((17,), 0.5, device=device, dtype=dtype)  # std 0: unchanged
    want = [t.clone() for t in tensors]
    noisytune_(tensors, 0.15, seed=99, backend=backend)
    reference.noisytune_(want, 0.15, seed=99)
    worst = 0.0
    for t, w in zip(tensors, want):
        # the std is float64 everywhere (contract C2): bit-identical in float32/16-bit; a
        # float64 std summed in another order may differ in its last bit
        tol = 0.0 if dtype != torch.float64 else 4 * torch.finfo(dtype).eps * float(
            w.abs().max())
        worst = max(worst, float(((t.double() - w.double()).abs() - tol).clamp(min=0).max()))
    detail = "bit-identical" if dtype != torch.float64 else "within 4 ulp (float64 std order)"
    return Row(backend, "noisytune", str(dtype).replace("torch.", ""), worst,
               "ok" if worst == 0 else "FAIL", detail)


def _skip_reason(backend: str, device, dtype) -> Optional[str]:
    # (the Triton interpreter's bfloat16 is the backend's own unavailable_reason)
    return get_backend(backend).unavailable_reason(device, dtype)


def run_checks(device="cpu", backends: Optional[List[str]] = None, progress=None) -> List[Row]:
    device = torch.device(device)
    names = backends or available_backends(device)
    rows = [check_philox()]
    for name in names:
        reason = get_backend(name).unavailable_reason(device)
        if reason is not None:
            rows.append(Row(name, "all", "-", None, "FAIL", reason))
            continue
        for noise in NOISES:
            if progress:
                progress(f"{name}: stats/{noise}")
            rows.append(_guard(lambda: _stats_row(name, noise, device), name, f"stats/{noise}",
                               "float32"))
        for dtype_name, dtype in DTYPES.items():
            skip = _skip_reason(name, device, dtype)
            if skip:
                rows.append(Row(name, "all", dtype_name, None, "skip", skip))
                continue
            for noise in NOISES:
                if progress:
                    progress(f"{name}: forward/{noise} {dtype_name}")
                rows.append(_guard(lambda: _forward_row(name, noise, dtype, device), name,
                                   f"forward/{noise}", dtype_name))
            rows.append(_guard(lambda: _backward_row(name, dtype, device), name, "backward",
                               dtype_name))
            rows.append(_guard(lambda: _noisytune_row(name, dtype, device), name, "noisytune",
                               dtype_name))
    return rows


def _forward_row(name, noise, dtype, device) -> Row:
    err = _forward_error(name, noise, dtype, device)
    if noise == "gaussian":
        tol, how = 2e-6, "|err| <= 2e-6 mag + 1 ulp"
    else:
        tol, how = 0.0, "bit-exact"
    return Row(name, f"forward/{noise}", str(dtype).replace("torch.", ""), err,
               "ok" if err <= tol else "FAIL", how)


def _guard(fn, backend, op, dtype) -> Row:
    try:
        return fn()
    except Exception as exc:  # a crashing backend is a failed check, not a crashed check
        return Row(backend, op, dtype, None, "FAIL", f"{type(exc).__name__}: {exc}")


def format_table(rows: List[Row]) -> str:
    header = ("backend", "op", "dtype", "max error", "status", "detail")
    body = [(r.backend, r.op, r.dtype, "-" if r.max_error is None else f"{r.max_error:.3g}",
             r.status, r.detail) for r in rows]
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header[:5], widths)) + "  " + header[5]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    for r in body:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnoise check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--backend", action="append", choices=BACKEND_NAMES,
                        help="check only this backend (repeatable); default: all available")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cpu" and not torch.cuda.is_available() and "triton" not in sys.modules:
        # no GPU: validate the Triton kernels' logic through the Triton interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    found = available_backends(device)
    print(f"fastnoise check on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}")
    # what was compiled, for which archs, with what (pip hides the build's own output)
    print(format_build_info())
    for name in BACKEND_NAMES:
        if name not in found:
            print(f"  {name:9s} not available: {get_backend(name).unavailable_reason(device)}")
    start = time.perf_counter()
    progress = None
    if sys.stderr.isatty():
        progress = lambda msg: print(f"\r\033[K  ... {msg}", end="", file=sys.stderr, flush=True)
    rows = run_checks(device, args.backend, progress=progress)
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    print(format_table(rows))
    failed = sum(r.status == "FAIL" for r in rows)
    passed = sum(r.status == "ok" for r in rows)
    skipped = sum(r.status == "skip" for r in rows)
    print(f"\n{passed} passed, {failed} failed, {skipped} skipped "
          f"in {time.perf_counter() - start:.1f} s (backends: {', '.join(args.backend or found)})")
    return 1 if failed else 0
