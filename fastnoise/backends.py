"""Backend registry: which implementation runs an op, and why one is not available.

A backend is an object with

* ``name``: "reference", "triton", "cuda" or "cpu";
* ``unavailable_reason(device, dtype=None) -> Optional[str]``: None when it can run on that
  device (and weight dtype), else a sentence saying what is missing and how to get it;
* ``embedding_forward(ids, weight, out, *, noise, mag, tok_mag, seed, offset, symmetric,
  embed_scale=1.0, seed_tensor=None, error=None)``: writes the noisy embedding of the flat ids (N,) into
  ``out`` (N, d), or (2N, d) when symmetric (rows [0, N) = e + n, [N, 2N) = e - n).
  ``tok_mag`` is None (use the float ``mag``) or a float32 (N,) per-token scale. ``seed``,
  ``offset`` are ints in [0, 2**64). ``embed_scale`` (a float, Gemma's scaled embedding,
  already rounded to the weight's dtype) != 1 first makes ``e = dtype(e * embed_scale)``,
  then adds the noise; 1.0 must cost nothing (the kernels compile it out). ``seed_tensor``
  (None, or an int64 tensor of shape (1,) on the weight's device) is the CUDA-graph-safe
  seed: when given it overrides ``seed`` (its value read as the uint64 with the same bits,
  e.g. -5 -> 2**64 - 5) and the offset is 0 (``offset`` is ignored). The kernels read it at
  run time, on the device (no host sync, no ``.item()``), so a graph captured around
  ``torch.randint`` + the forward draws new noise on every replay. Ids out of range (< 0 or
  >= V) never read out of bounds and never give a silently wrong row: the kernel either
  raises at once (C++ CPU; the reference) or writes NaN for the whole output row of that
  token and records the bad id in ``error`` (None, or the device's int64 (4,) buffer of
  :mod:`fastnoise.errors`: ``error[1] = id``, ``error[2] = V``, then ``error[0] = 1``, by
  atomic exchange; ids in range never touch it) (Triton, CUDA);
* ``embedding_backward(grad_out, ids, num_weights, *, padding_idx, symmetric, deterministic,
  embed_scale=1.0)`` -> the weight's gradient (num_weights, d), dtype of ``grad_out``,
  accumulated in float32 (float64 for a float64 ``grad_out``): ``embed_scale * (the grad rows summed per id)``, each float32
  token row (the pair's halves summed first) multiplied by float32(embed_scale) before it
  is accumulated; ids out of range contribute nothing (never written out of bounds) or
  raise (CPU);
* optionally ``token_scale(alpha, d, n, row, attention_mask, position_ids, cu_seqlens,
  error)`` -> the float32 (n,) per-token scale of :func:`fastnoise.reference.token_scale`,
  with invalid packing inputs recorded in ``error`` (C1), computed by the backend's own
  kernels (Triton's); without it the Python op uses the reference's torch ops;
* ``noisytune_(tensors, lam, *, seed, starts, stds=None)``: perturbs each tensor in place,
  tensor k from counter ``starts[k]``; ``stds`` (None, or one Python float per tensor) is
  used as the tensor's std64 instead of its own (C5: a shard gets its whole parameter's std).

All of them follow the randomness contract and the math of :mod:`fastnoise.reference`.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from . import reference

BACKEND_NAMES = ("reference", "triton", "cuda", "cpu")
#: the ops a backend runs; "auto" resolves each on its own
OPS = ("forward", "backward", "noisytune")
#: "auto" tries these in order, per device type and op; the first available wins. Per op
#: because the fastest backend can differ by op: ``python -m fastnoise bench`` times every
#: backend on every op and prints the fastest next to auto's pick, so this table follows
#: measurements (bench/RESULTS.md). On CUDA it is Triton first until a GPU run says otherwise.
AUTO_ORDER = {
    "cuda": {op: ("triton", "cuda", "reference") for op in OPS},
    "cpu": {op: ("cpu", "reference") for op in OPS},
}


def auto_order(device_type: str, op: str = "forward"):
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return AUTO_ORDER.get(device_type, {}).get(op, ("reference",))


class BackendUnavailableError(RuntimeError):
    """Raised when a backend asked for by name cannot run here."""


class ReferenceBackend:
    """The pure-PyTorch definition, on any device."""

    name = "reference"

    def unavailable_reason(self, device, dtype=None):
        return None

    def embedding_forward(self, ids, weight, out, *, noise, mag, tok_mag, seed, offset,
                          symmetric, embed_scale=1.0, seed_tensor=None, error=None):
        if seed_tensor is not None:
            # the definition; a host sync (the reference is not meant for graph capture)
            seed, offset = int(seed_tensor.reshape(-1)[0].item()) % 2**64, 0
        out.copy_(reference.noisy_embedding(ids, weight, noise=noise, mag=mag, tok_mag=tok_mag,
                                            seed=seed, offset=offset, symmetric=symmetric,
                                            embed_scale=embed_scale))

    def embedding_backward(self, grad_out, ids, num_weights, *, padding_idx, symmetric,
                           deterministic, embed_scale=1.0):
        grad = reference.embedding_backward(grad_out, ids, num_weights,
                                            padding_idx=padding_idx, symmetric=symmetric,
                                            embed_scale=embed_scale)
        return grad.to(grad_out.dtype)

    def noisytune_(self, tensors, lam, *, seed, starts, stds=None):
        for k, (t, start) in enumerate(zip(tensors, starts)):
            reference.noisytune_([t], lam, seed=seed, offset=start,
                                 stds=None if stds is None else [stds[k]])


class _LazyBackend:
    """A backend whose module is imported on first use (Triton and the extension are heavy)."""

    def __init__(self, name: str, module: str, attr: str):
        self.name = name
        self._module_name = module
        self._attr = attr
        self._impl = None
        self._import_error: Optional[str] = None

    def _load(self):
        if self._impl is None and self._import_error is None:
            import importlib
            try:
                mod = importlib.import_module(self._module_name, __package__)
                self._impl = getattr(mod, self._attr)
            except Exception as exc:  # ImportError, or a broken build of the extension
                self._import_error = f"{type(exc).__name__}: {exc}"
        return self._impl

    def unavailable_reason(self, device, dtype=None):
        impl = self._load()
        if impl is None:
            return f"the {self.name!r} backend failed to load ({self._import_error})"
        return impl.unavailable_reason(device, dtype)

    def __getattr__(self, attr):
        impl = self._load()
        if impl is None:
            raise BackendUnavailableError(
                f"the {self.name!r} backend failed to load ({self._import_error})")
        return getattr(impl, attr)


_REGISTRY: Dict[str, object] = {
    "reference": ReferenceBackend(),
    "triton": _LazyBackend("triton", ".triton_ops", "BACKEND"),
    "cuda": _LazyBackend("cuda", ".extension", "CUDA_BACKEND"),
    "cpu": _LazyBackend("cpu", ".extension", "CPU_BACKEND"),
}


#: bumped whenever the registry changes: settled calls (fastnoise.ops.settle) made before are
#: settled again
REGISTRY_VERSION = [0]


def register_backend(name: str, backend) -> None:
    """Replace or add a backend (tests use this to plant a broken one)."""
    _REGISTRY[name] = backend
    REGISTRY_VERSION[0] += 1


def get_backend(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of "
                         f"{tuple(_REGISTRY)}") from None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device="cpu", dtype: Optional[torch.dtype] = None,
                       op: str = "forward") -> List[str]:
    """Names of the backends that can run on ``device`` (and weight ``dtype``), auto's pick
    for ``op`` first."""
    device = torch.device(device)
    order = list(auto_order(device.type, op))
    names = order + [n for n in _REGISTRY if n not in order]
    return [n for n in names if _REGISTRY[n].unavailable_reason(device, dtype) is None]


_RESOLVED: Dict[tuple, object] = {}


def resolve_backend(name: str, device, dtype: Optional[torch.dtype] = None,
                    op: str = "forward"):
    """The backend object for ``name`` ("auto" included, resolved per ``op``) on ``device``;
    raises if unavailable.

    Successful answers are cached (this runs on every call); a backend replaced in the
    registry (tests plant doubles) is looked up again.
    """
    key = (name, str(device), dtype, op, os.environ.get("TRITON_INTERPRET"))
    hit = _RESOLVED.get(key)
    if hit is not None and _REGISTRY.get(hit.name) is hit:
        return hit
    chosen = _resolve(name, torch.device(device), dtype, op)
    _RESOLVED[key] = chosen
    return chosen


def clear_cache() -> None:
    """Forget resolved backends and settled calls (after editing AUTO_ORDER at run time)."""
    _RESOLVED.clear()
    REGISTRY_VERSION[0] += 1


def _resolve(name: str, device: torch.device, dtype: Optional[torch.dtype], op: str):
    if name == "auto":
        for candidate in auto_order(device.type, op):
            if _REGISTRY[candidate].unavailable_reason(device, dtype) is None:
                return _REGISTRY[candidate]
        return _REGISTRY["reference"]
    backend = get_backend(name)
    reason = backend.unavailable_reason(device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return backend
