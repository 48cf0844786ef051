"""Compile every Triton kernel variant the launchers use to machine code for one NVIDIA arch,
with no GPU: Triton builds the cubin with its bundled ptxas, and ``ptxas -v`` on the same PTX
reports the resources.

Prints one JSON object per variant: kernel, variant, warps, registers, stack frame, spill
bytes, Triton's dynamic shared memory and the count of 16-byte global loads/stores in the PTX.
Run as a subprocess with TRITON_INTERPRET unset (the interpreter replaces ``@triton.jit``
functions, so nothing could be compiled in the test process); tests/test_triton_compile.py
drives it. By hand: ``python tests/triton_compile_worker.py 90``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastnoise.triton_ops import embedding as E  # noqa: E402
from fastnoise.triton_ops import noisytune as NT  # noqa: E402
from fastnoise.triton_ops import token_scale as TS  # noqa: E402

DTYPES = ("fp32", "fp16", "bf16")
#: the shapes of #3's targets (B=8 L=2048 d=4096) and its tiny shape (B=1 L=512 d=768)
BIG, TINY = (8 * 2048, 4096), (512, 768)


#: the integer arguments' values at those shapes: Triton specializes ints divisible by 16
V = 32000


def _fwd_variants():
    for dtype in DTYPES:
        for noise, code in E.NOISE_CODES.items():
            yield f"{noise} {dtype}", dtype, code, BIG, {}
    for noise in ("uniform", "gaussian"):
        yield (f"{noise} bf16 mask+pair+scale+seed_ptr", "bf16", E.NOISE_CODES[noise], BIG,
               dict(HAS_TOK_MAG=True, SYMMETRIC=True, HAS_SCALE=True, SEED_FROM_PTR=True))
    yield "uniform bf16 int32 ids", "bf16", 0, BIG, dict(ids="*i32")
    # the bad-id error buffer (C1), alone and with every other flag
    for dtype in DTYPES:
        yield f"uniform {dtype} error", dtype, 0, BIG, dict(HAS_ERROR=True)
    for noise in ("gaussian", "bernoulli"):
        yield (f"{noise} bf16 error+mask+pair+scale+seed_ptr", "bf16", E.NOISE_CODES[noise], BIG,
               dict(HAS_TOK_MAG=True, SYMMETRIC=True, HAS_SCALE=True, SEED_FROM_PTR=True,
                    HAS_ERROR=True))
    yield "uniform bf16 int32 ids error", "bf16", 0, BIG, dict(ids="*i32", HAS_ERROR=True)
    yield "uniform bf16 tiny", "bf16", 0, TINY, {}


def variants():
    """(kernel, variant name, signature, constexprs, int values, num_warps) of every launch
    config."""
    for name, dtype, code, (n, d), extra in _fwd_variants():
        block_t, block_d, num_warps, _ = E._fwd_config(n, d, code)
        sig = {"ids_ptr": extra.pop("ids", "*i64"), "w_ptr": "*" + dtype, "out_ptr": "*" + dtype,
               "tok_mag_ptr": "*fp32", "seed_ptr": "*i64", "error_ptr": "*i64", "N": "i32",
               "V": "i32", "d": "i32", "w_row_stride": "i32", "mag": "fp32",
               "embed_scale": "fp32", "seed_lo": "i32", "seed_hi": "i32", "off_lo": "i32",
               "off_hi": "i32"}
        const = dict(NOISE=code, HAS_TOK_MAG=False, SYMMETRIC=False, HAS_SCALE=False,
                     SEED_FROM_PTR=False, HAS_ERROR=False, BLOCK_T=block_t, BLOCK_D=block_d,
                     VEC=4 if dtype == "fp32" else 8)
        const.update(extra)
        ints = dict(N=n, V=V, d=d, w_row_stride=d)
        yield E._noisy_embedding_fwd_kernel, "forward " + name, sig, const, ints, num_warps
    n, d = BIG
    ints = dict(N=n, V=V, d=d, padding_idx=-1)
    block_t, block_d, num_warps, _ = E._bwd_config(n, d, True)
    yield (E._embedding_bwd_atomic_kernel, "backward atomic fp32 pair+scale",
           {"grad_ptr": "*fp32", "ids_ptr": "*i64", "out_ptr": "*fp32", "N": "i32", "V": "i32",
            "d": "i32", "padding_idx": "i32", "embed_scale": "fp32"},
           dict(SYMMETRIC=True, HAS_SCALE=True, BLOCK_T=block_t, BLOCK_D=block_d), ints,
           num_warps)
    for (n, d), shape in ((BIG, ""), (TINY, " tiny")):
        _, block_d, num_warps, _ = E._bwd_config(n, d, False)
        ints = dict(N=n, V=V, d=d, padding_idx=-1)
        for kernel, step in ((E._embedding_bwd_chunk_kernel, "chunk"),
                             (E._embedding_bwd_combine_kernel, "combine")):
            for dtype in DTYPES:
                for flags, extra in (("", dict(SYMMETRIC=False, HAS_SCALE=False)),
                                     (" pair+scale", dict(SYMMETRIC=True, HAS_SCALE=True))):
                    if shape and (dtype != "bf16" or flags):
                        continue
                    for ids in ("i64", "i32") if dtype == "bf16" and not flags else ("i64",):
                        yield (kernel, f"backward {step} {dtype}{flags}{shape}"
                               + (" int32 ids" if ids == "i32" else ""),
                               {"grad_ptr": "*" + dtype, "sorted_ids_ptr": "*" + ids,
                                "perm_ptr": "*i64", "out_ptr": "*" + dtype,
                                "partial_ptr": "*fp32", "N": "i32", "V": "i32", "d": "i32",
                                "padding_idx": "i32", "embed_scale": "fp32"},
                               dict(CHUNK=E._CHUNK, BLOCK_D=block_d, **extra), ints, num_warps)
    for dtype, code in (("fp32", 0), ("fp16", 1), ("bf16", 2)):
        yield from _noisytune_variants(dtype, code, True)
    yield from _noisytune_variants("bf16", 2, False)
    yield from _noisytune_merge_variant()  # dtype-free: it reads only the float64 partials
    yield from _token_scale_variants()


def _noisytune_variants(dtype, code, aligned):
    name = f" {dtype}" + ("" if aligned else " unaligned")
    yield (NT._noisytune_stats_kernel, "noisytune stats" + name,
           {"meta_ptr": "*i64", "partial_ptr": "*fp64", "n_tensors": "i32"},
           dict(META=NT._META, BLOCK=NT.BLOCK, ITERS=NT.ITERS, DTYPE=code, ALIGNED=aligned),
           dict(n_tensors=147), 4)
    yield (NT._noisytune_perturb_kernel, "noisytune perturb" + name,
           {"meta_ptr": "*i64", "stats_ptr": "*fp32", "n_tensors": "i32", "seed_lo": "i32",
            "seed_hi": "i32"},
           dict(META=NT._META, BLOCK=NT.BLOCK, ITERS=NT.ITERS, DTYPE=code, ALIGNED=aligned),
           dict(n_tensors=147), 4)


def _noisytune_merge_variant():
    yield (NT._noisytune_merge_kernel, "noisytune merge",
           {"meta_ptr": "*i64", "partial_ptr": "*fp64", "stats_ptr": "*fp32", "lam": "fp32"},
           dict(META=NT._META, CHUNK=NT.CHUNK, MERGE_BLOCK=NT.MERGE_BLOCK), {}, 4)


def _token_scale_variants():
    """The per-token scale of a mask or packed rows: rows of 2048 tokens, 16 K tokens."""
    n, row = BIG[0], 2048
    rows_sig = {"mask_ptr": "*i64", "pos_ptr": "*i64", "mag_ptr": "*fp32", "first_ptr": "*i32",
                "scratch_ptr": "*i32", "error_ptr": "*i64", "n": "i32", "row": "i32", "d": "i32",
                "alpha_bits": "i64"}
    for name, mask, pos in (("mask", True, False), ("positions", False, True),
                            ("mask+positions", True, True)):
        yield (TS._token_scale_rows_kernel, f"token scale rows {name} error", rows_sig,
               dict(HAS_MASK=mask, HAS_POS=pos, HAS_ERROR=True, BLOCK=TS.BLOCK),
               dict(n=n, row=row, d=BIG[1]), 4)
    cu_sig = {"mask_ptr": "*i64", "cu_ptr": "*i32", "scratch_ptr": "*i32", "mag_ptr": "*fp32",
              "error_ptr": "*i64", "n": "i32", "cu_len": "i32", "d": "i32", "alpha_bits": "i64"}
    for mask in (False, True):
        yield (TS._token_scale_cu_kernel, "token scale cu_seqlens" + (" mask" if mask else ""),
               cu_sig, dict(STEPS=10, HAS_MASK=mask, HAS_ERROR=True, BLOCK=TS.BLOCK),
               dict(n=n, cu_len=65, d=BIG[1]), 4)
    yield (TS._token_scale_cu_count_kernel, "token scale cu_seqlens mask count",
           {"mask_ptr": "*i64", "cu_ptr": "*i32", "scratch_ptr": "*i32", "n": "i32"},
           dict(BLOCK=TS.BLOCK), dict(n=n), 4)


def _signature(kernel, sig, const, ints):
    missing = [a for a in kernel.arg_names if a not in sig and a not in const]
    if missing:  # a kernel grew an argument: this table must follow
        raise SystemExit(f"{kernel.__name__}: no type for {missing} in triton_compile_worker")
    full = {a: sig.get(a, "constexpr") for a in kernel.arg_names}
    # what Triton specializes at launch: 16-byte aligned pointers (torch allocations are) and
    # ints divisible by 16 carry tt.divisibility = 16, which lets it vectorize loads/stores
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
             if full[a].startswith("*") or (a in ints and ints[a] % 16 == 0)}
    return full, attrs


def _ptxas(arch: int):
    """The ptxas Triton itself uses for ``arch`` (it bundles two, for older and newer PTX)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "ptxas")
        return bundled if os.path.exists(bundled) else shutil.which("ptxas")


def _resources(ptxas, ptx, tmp):
    """registers, stack frame and spill bytes, as ``ptxas -v`` reports them (fmad off, as
    the launches compile)."""
    path = os.path.join(tmp, "k.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)[1]  # Triton picks sm_90a on Hopper
    info = subprocess.run([ptxas, f"-arch={target}", "-v", "--fmad=false", path, "-o",
                           os.path.join(tmp, "k.o")], check=True, capture_output=True,
                          text=True).stderr
    stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", info)
    regs = re.search(r"Used (\d+) registers", info)
    return dict(registers=int(regs[1]), stack=int(stack[1]),
                spill=int(stack[2]) + int(stack[3]))


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    ptxas = _ptxas(arch)
    with tempfile.TemporaryDirectory() as tmp:
        for kernel, name, sig, const, ints, num_warps in variants():
            full, attrs = _signature(kernel, sig, const, ints)
            src = ASTSource(fn=kernel, signature=full, constexprs=const, attrs=attrs)
            compiled = triton.compile(src, target=target,
                                      options={"num_warps": num_warps, "enable_fp_fusion": False})
            ptx = compiled.asm["ptx"]
            row = {"arch": arch, "kernel": kernel.__name__, "variant": name,
                   "num_warps": num_warps, "dynamic_shared": compiled.metadata.shared,
                   "v4_loads": ptx.count("ld.global.v4"), "v4_stores": ptx.count("st.global.v4"),
                   "atomics": ptx.count("atom.")}
            if ptxas:
                row.update(_resources(ptxas, ptx, tmp))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
