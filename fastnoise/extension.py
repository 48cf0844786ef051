"""The compiled backends ("cpu" and "cuda") over the ``fastnoise._C`` extension.

``fastnoise._C`` registers the ops ``torch.ops.fastnoise.embedding_forward``,
``embedding_backward``, ``noisytune_`` (C++ CPU kernels, and CUDA kernels when built with
nvcc) and ``cuda_built``. This module loads it if it was built, remembers why not otherwise,
registers a fake (meta) implementation of every op so they trace under torch.compile /
FakeTensor, and exposes :data:`CPU_BACKEND` and :data:`CUDA_BACKEND` for
:mod:`fastnoise.backends`. The user-facing op ``torch.ops.fastnoise.noisy_embedding`` has its
autograd in C++ (csrc/autograd.cpp); its eager entry is ``_C.noisy_embedding``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import build, errors
from .ops import NOISE_CODES, as_int64, output_shape

__all__ = ["CPU_BACKEND", "CUDA_BACKEND", "BUILD_HINT", "NOISE_CODES", "is_built",
           "load_error", "cuda_built", "ExtensionBackend"]

BUILD_HINT = f"run {build.REBUILD_HINT}"

# Loaded only if the build record allows it (compiled at all, for this torch): another
# torch's extension is refused with one sentence, never an undefined-symbol traceback.
_C, _LOAD_ERROR = build.load_extension()


def is_built() -> bool:
    """Whether ``fastnoise._C`` loaded."""
    return _C is not None


def load_error() -> Optional[str]:
    """Why ``fastnoise._C`` did not load (None when it did)."""
    return _LOAD_ERROR


def cuda_built() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    return _C is not None and bool(torch.ops.fastnoise.cuda_built())


if _C is not None:
    @torch.library.register_fake("fastnoise::embedding_forward")
    def _embedding_forward_fake(ids, weight, out, noise, mag, tok_mag, seed, offset,
                                symmetric, embed_scale=1.0, seed_tensor=None, error=None):
        return None

    @torch.library.register_fake("fastnoise::embedding_backward")
    def _embedding_backward_fake(grad_out, ids, num_weights, padding_idx, symmetric,
                                 deterministic, embed_scale=1.0):
        return grad_out.new_empty((num_weights, grad_out.shape[-1]))

    @torch.library.register_fake("fastnoise::noisytune_")
    def _noisytune_fake(tensors, lam, seed, starts, stds=None):
        return None

    @torch.library.register_fake("fastnoise::noisy_embedding")
    def _noisy_embedding_fake(weight, ids, attention_mask, position_ids, cu_seqlens, noise,
                              alpha, seed, offset, draw_seed, symmetric, padding_idx,
                              embed_scale):
        from .ops import check_forward_args  # the C++ op's checks, in Python
        check_forward_args(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha,
                           symmetric, padding_idx)
        return weight.new_empty(output_shape(ids, weight.shape[1], symmetric))

    @torch.library.register_fake("fastnoise::noisy_embedding_backward")
    def _noisy_embedding_backward_fake(grad_out, ids, num_weights, padding_idx, symmetric,
                                       embed_scale):
        from .ops import check_backward_args
        check_backward_args(grad_out, ids, num_weights, symmetric)
        return grad_out.new_empty((num_weights, grad_out.shape[-1]))

    # the C++ ops record into the error buffers fastnoise.errors makes (outside any capture);
    # the CPU's now, so that the op can be called directly (a CUDA device's at its first
    # settled call: making it here would start CUDA at import)
    errors.add_buffer_listener(torch.ops.fastnoise.set_error_buffer)
    errors.error_buffer(torch.device("cpu"))


class ExtensionBackend:
    """A backend over the compiled ops, for one device type ("cpu" or "cuda")."""

    _DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_type = device_type
        # torch.ops.fastnoise.noisy_embedding entered from eager Python without schema
        # matching (fastnoise.ops.SettledCall calls it)
        self.fused_entry = None if _C is None else _C.noisy_embedding

    def __repr__(self) -> str:
        return f"<fastnoise {self.name!r} backend (C++ extension)>"

    def unavailable_reason(self, device, dtype=None) -> Optional[str]:
        if _C is None:
            return f"the fastnoise C++ extension is not available: {_LOAD_ERROR}"
        device = torch.device(device)
        if device.type != self.device_type:
            return (f"the {self.name!r} backend runs on {self.device_type} tensors, "
                    f"not {device.type}")
        if self.device_type == "cuda" and not cuda_built():
            why = ((build.recorded() or {}).get("missing") or {}).get("cuda")
            return ("the fastnoise C++ extension was built without its CUDA kernels"
                    + (f" ({why})" if why else "") + ": reinstall with nvcc (CUDA_HOME) and "
                    f"a CUDA build of torch present: {build.REBUILD_CMD}")
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device here (torch.cuda.is_available() is False)"
        if dtype is not None and dtype not in self._DTYPES:
            return (f"the {self.name!r} backend supports float32, float16, bfloat16 and "
                    f"float64 weights, not {dtype}")
        if self.device_type == "cuda":
            # built archs vs this GPU: else it is listed and then fails with "no kernel image"
            return build.cuda_device_problem(device)
        return None

    def embedding_forward(self, ids, weight, out, *, noise, mag, tok_mag, seed, offset,
                          symmetric, embed_scale=1.0, seed_tensor=None, error=None):
        try:
            code = NOISE_CODES[noise]
        except KeyError:
            raise ValueError(f"unknown noise kind {noise!r}; expected one of "
                             f"{tuple(NOISE_CODES)}") from None
        torch.ops.fastnoise.embedding_forward(ids, weight, out, code, float(mag), tok_mag,
                                              as_int64(seed), as_int64(offset),
                                              bool(symmetric), float(embed_scale),
                                              seed_tensor, error)
        return out

    def embedding_backward(self, grad_out, ids, num_weights, *, padding_idx, symmetric,
                           deterministic, embed_scale=1.0):
        return torch.ops.fastnoise.embedding_backward(
            grad_out, ids, int(num_weights), None if padding_idx is None else int(padding_idx),
            bool(symmetric), bool(deterministic), float(embed_scale))

    def noisytune_(self, tensors: Sequence[torch.Tensor], lam, *, seed, starts, stds=None):
        tensors = list(tensors)
        if not tensors:
            return
        torch.ops.fastnoise.noisytune_(tensors, float(lam), as_int64(seed),
                                       [as_int64(s) for s in starts],
                                       None if stds is None else [float(s) for s in stds])


CPU_BACKEND = ExtensionBackend("cpu", "cpu")
CUDA_BACKEND = ExtensionBackend("cuda", "cuda")
