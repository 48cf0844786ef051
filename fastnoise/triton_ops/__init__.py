"""Triton backend: fused noisy-embedding forward/backward and multi-tensor NoisyTune kernels.

Runs on CUDA devices, or on the CPU through the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is first imported; the CI tests use it).
"""

from typing import Optional

import torch

from ..backends import BackendUnavailableError, triton_interpreter_enabled

try:
    import triton  # noqa: F401
except Exception as exc:  # ImportError, or a broken install
    _MISSING: Optional[str] = getattr(exc, "name", None) if isinstance(
        exc, ModuleNotFoundError) else None
    _IMPORT_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    _MISSING = _IMPORT_ERROR = None

# the kernels are decorated at import: they are interpreted only if the flag was on by then
_INTERPRETED_AT_IMPORT = triton_interpreter_enabled()
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if _IMPORT_ERROR is None:
    from . import embedding as _emb
    from . import noisytune as _nt
    from . import token_scale as _ts


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, device, dtype=None) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            if _MISSING == "triton":
                return "triton is not installed (pip install triton)"
            if _MISSING:  # e.g. numpy, which the interpreter needs
                return f"triton cannot import {_MISSING!r} (pip install {_MISSING})"
            return f"triton failed to import ({_IMPORT_ERROR})"
        device = torch.device(device)
        if device.type == "cpu":
            if not triton_interpreter_enabled():
                return "needs a CUDA device or TRITON_INTERPRET=1"
            if not _INTERPRETED_AT_IMPORT:
                return ("TRITON_INTERPRET=1 was set after fastnoise's triton kernels were "
                        "imported; set it before importing fastnoise")
        elif device.type != "cuda":
            return f"needs a CUDA device or TRITON_INTERPRET=1 (got {device.type})"
        elif _INTERPRETED_AT_IMPORT:
            return "the Triton interpreter is on (TRITON_INTERPRET=1): CPU tensors only"
        elif not torch.cuda.is_available():
            return "no CUDA device here (torch.cuda.is_available() is False)"
        if dtype is not None and dtype not in _DTYPES:
            name = str(dtype).replace("torch.", "")
            return f"dtype {name} not supported (float32, float16, bfloat16)"
        if dtype == torch.bfloat16 and device.type == "cpu":
            # numpy has no bfloat16: the interpreter truncates float32 -> bfloat16 instead of
            # rounding to nearest, so about half the elements would be 1 ulp off the contract
            return ("bfloat16 needs a CUDA device: the Triton interpreter (TRITON_INTERPRET=1) "
                    "rounds float32 to bfloat16 by truncation, not to nearest")
        return None

    def embedding_forward(self, ids, weight, out, *, noise, mag, tok_mag, seed, offset,
                          symmetric, embed_scale=1.0, seed_tensor=None, error=None):
        _emb.noisy_embedding_forward(ids, weight, out, noise=noise, mag=mag, tok_mag=tok_mag,
                                     seed=seed, offset=offset, symmetric=symmetric,
                                     embed_scale=embed_scale, seed_tensor=seed_tensor,
                                     error=error)

    def token_scale(self, alpha, d, n, row, attention_mask, position_ids, cu_seqlens, error):
        return _ts.token_scale(alpha, d, n, row, attention_mask, position_ids, cu_seqlens,
                               error)

    def embedding_backward(self, grad_out, ids, num_weights, *, padding_idx, symmetric,
                           deterministic, embed_scale=1.0):
        return _emb.embedding_backward(grad_out, ids, num_weights, padding_idx=padding_idx,
                                       symmetric=symmetric, deterministic=deterministic,
                                       embed_scale=embed_scale)

    def noisytune_(self, tensors, lam, *, seed, starts, stds=None):
        # every tensor is checked before any is touched (a retry must not perturb twice)
        for key in {(t.device, t.dtype) for t in tensors if t.numel()}:
            reason = self.unavailable_reason(*key)
            if reason is not None:
                raise BackendUnavailableError(f"backend 'triton' cannot run on {key[0]} with "
                                              f"{key[1]}: {reason}")
        _nt.noisytune_(tensors, lam, seed=seed, starts=starts, stds=stds)


BACKEND = TritonBackend()
