"""``NoisyEmbedding`` and the in-place noisy class that :func:`fastnoise.patch` gives an
existing embedding module.

Noise rule (one for both): noise is added only while the module is in training mode **and**
autograd is recording (``torch.is_grad_enabled()``). A forward under ``torch.no_grad()`` or
``torch.inference_mode()`` is noise-free even in training mode: that is how TRL's DPO-family
trainers compute the reference log-probs with the policy model itself (PEFT adapters disabled
or a "ref" adapter, model still in training mode), and the reference must be the clean model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .backends import BackendUnavailableError, get_backend
from .functional import (check_finite, check_method, check_noise, check_nonnegative,
                         check_padding_idx, plain_embedding)

__all__ = ["NoisyEmbedding", "noise_active"]

_CONTEXT = "_fastnoise_context"  # set by fastnoise.patch: the model call's mask / packing inputs
_BASE = "_fastnoise_base"        # on a patched class: the class it was made from


def noise_active(module: nn.Module) -> bool:
    """The noise rule: training mode and autograd recording."""
    return module.training and torch.is_grad_enabled()


def _if_shaped_like(value, input):
    if isinstance(value, torch.Tensor) and value.shape == input.shape:
        return value
    return None


def settle_early(module: "NoisyEmbedding") -> None:
    """Settle the module's call now, when it is built or patched (outside any CUDA graph
    capture, and not inside a compiled region's first trace). A backend that cannot run here
    raises at the first noisy call instead, with its reason."""
    if module.weight.is_meta:
        return
    try:
        module._settle()
    except BackendUnavailableError:
        pass


def check_embedding_supported(embedding: nn.Module) -> None:
    """What the fused kernel cannot do: raise rather than silently drop the option."""
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"fastnoise needs an nn.Embedding, got {type(embedding).__name__}")
    unsupported = [name for name, value in (("max_norm", embedding.max_norm is not None),
                                            ("scale_grad_by_freq", embedding.scale_grad_by_freq),
                                            ("sparse", embedding.sparse)) if value]
    if unsupported:
        raise ValueError(f"NoisyEmbedding does not support an embedding with "
                         f"{', '.join(unsupported)} set")


def embed_scale_of(embedding: nn.Module) -> float:
    """A scaled embedding's factor (Gemma's ``embed_scale`` buffer), read once as a float."""
    scale = getattr(embedding, "embed_scale", 1.0)
    if isinstance(scale, torch.Tensor):
        if scale.is_meta:
            raise ValueError(f"{type(embedding).__name__}.embed_scale is on the meta device; "
                             "materialize the model before patching it")
        scale = scale.item()  # once, at patch time; never in forward
    return float(scale)


def resolve_settings(method: Optional[str], noise: Optional[str], alpha,
                     symmetric: Optional[bool]):
    """(noise, alpha, symmetric) from a method preset and explicit overrides, checked."""
    preset_noise, preset_symmetric = (check_method(method) if method is not None
                                      else ("uniform", False))
    noise = check_noise(preset_noise if noise is None else noise)
    symmetric = bool(preset_symmetric if symmetric is None else symmetric)
    return noise, check_nonnegative("alpha", alpha), symmetric


class NoisyEmbedding(nn.Embedding):
    """``nn.Embedding`` that adds NEFTune / Gaussian / SymNoise noise in training mode.

    In eval mode, or under ``torch.no_grad()``, it is exactly ``nn.Embedding`` (see the
    module docstring for why). In training mode it calls :func:`fastnoise.noisy_embedding`
    (one fused kernel). With ``symmetric=True`` a noisy forward returns twice the batch:
    ``cat([e + n, e - n])``.

    It is an ``nn.Embedding`` subclass, so code that checks ``isinstance(m, nn.Embedding)``
    (weight init, resizing, tying) keeps working. A module patched by :func:`fastnoise.patch`
    is an instance of a subclass of this class and of its own original class.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, *, noise: str = "uniform",
                 alpha: float = 5.0, symmetric: bool = False, backend: str = "auto",
                 embed_scale: float = 1.0, _weight: Optional[torch.Tensor] = None,
                 device=None, dtype=None):
        # nn.Embedding itself would take 1.5 and fail in backward
        padding_idx = check_padding_idx(padding_idx, num_embeddings)
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx,
                         _weight=_weight, device=device, dtype=dtype)
        self.noise = check_noise(noise)
        self.alpha = check_nonnegative("alpha", alpha)
        self.symmetric = bool(symmetric)
        if backend != "auto":
            get_backend(backend)  # an unknown name fails here, availability at the call
        self.backend = backend
        # a scaled embedding (Gemma's sqrt(d)): rows * embed_scale in the weight's dtype
        self.embed_scale = check_finite("embed_scale", embed_scale)
        settle_early(self)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, method: Optional[str] = None,
                       noise: Optional[str] = None, alpha: float = 5.0,
                       symmetric: Optional[bool] = None,
                       backend: str = "auto") -> "NoisyEmbedding":
        """A new ``NoisyEmbedding`` sharing ``embedding``'s weight Parameter (ties stay tied).

        ``method`` ("neftune", "gaussian", "symnoise") presets ``noise`` and ``symmetric``;
        explicit ``noise``/``symmetric`` override it. A scaled embedding (transformers'
        Gemma ``*ScaledWordEmbedding``, with an ``embed_scale``) keeps its scale, fused. The
        weight's shape and data are not read (a ZeRO-3 placeholder of shape (0,) is fine);
        hooks attached to ``embedding`` (FSDP2, DeepSpeed) do not carry over to the new module:
        to keep them, use :func:`fastnoise.patch`, which keeps the module object.
        """
        check_embedding_supported(embedding)
        noise, alpha, symmetric = resolve_settings(method, noise, alpha, symmetric)
        new = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=None,
                  noise=noise, alpha=alpha, symmetric=symmetric, backend=backend,
                  embed_scale=embed_scale_of(embedding), device="meta")
        new.weight = embedding.weight  # the same Parameter object, not a copy
        new.padding_idx = embedding.padding_idx
        new.train(embedding.training)
        settle_early(new)
        return new

    def forward(self, input: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None):
        if not (self.training and torch.is_grad_enabled()):  # noise_active, inlined
            return plain_embedding(input, self.weight, self.padding_idx, self.embed_scale)
        return self._noisy_forward(input, attention_mask, position_ids, cu_seqlens,
                                   self.embed_scale)

    def _noisy_forward(self, input, attention_mask, position_ids, cu_seqlens, embed_scale):
        # fastnoise.patch puts the model call's mask / packing inputs here for its duration
        context = self.__dict__.get(_CONTEXT)
        if context:
            if attention_mask is None:
                attention_mask = _if_shaped_like(context.get("attention_mask"), input)
            if position_ids is None and cu_seqlens is None:
                # a varlen model call carries both; the boundaries are the exact ones (their
                # values are checked on the device by the op)
                cu_seqlens = context.get("cu_seqlens")
                if cu_seqlens is None:
                    position_ids = _if_shaped_like(context.get("position_ids"), input)
        weight = self.weight
        # settled once per weight device and dtype (the backend resolved, the error buffer
        # made outside any capture); the op checks the rest
        call = self.__dict__.get("_fastnoise_call")
        if (call is None or call.dtype != weight.dtype or call.device != weight.device
                or call.requested != self.backend):
            call = self._settle()
        padding_idx = self.padding_idx
        return call(weight, input, attention_mask, position_ids, cu_seqlens,
                    ops.NOISE_CODES[self.noise], self.alpha, None, self.symmetric,
                    -1 if padding_idx is None else padding_idx, embed_scale)

    def _settle(self):
        """Resolve the backend for the weight's device and dtype, once (again only when they
        or the backend setting change)."""
        weight = self.weight
        call = self.__dict__["_fastnoise_call"] = ops.settle(self.backend, weight.device,
                                                             weight.dtype)
        return call

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.pop("_fastnoise_call", None)  # settled again after loading
        return state

    def extra_repr(self) -> str:
        scale = f", embed_scale={self.embed_scale}" if self.embed_scale != 1.0 else ""
        return (f"{nn.Embedding.extra_repr(self)}, noise={self.noise!r}, alpha={self.alpha}, "
                f"symmetric={self.symmetric}, backend={self.backend!r}{scale}")


class _PatchedEmbedding(NoisyEmbedding):
    """The noisy half of a patched class ``type(name, (_PatchedEmbedding, Original), {})``.

    The module object is the model's own (its parameters, buffers, and the hooks FSDP2 or
    DeepSpeed attached to it stay); only its class changes. Noise-free calls run the
    original class's forward unchanged; noisy calls run the fused kernel, with the original's
    ``embed_scale`` read once at patch time.
    """

    def forward(self, input, *args, **kwargs):
        base = type(self).__dict__.get(_BASE) or _base_class(type(self))
        if not noise_active(self):
            return base.forward(self, input, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"a patched {base.__name__} takes only the ids in a noisy forward, "
                            f"got {len(args)} more positional and {sorted(kwargs)} keyword "
                            "arguments")
        return self._noisy_forward(input, None, None, None, self._fastnoise_embed_scale)

    def extra_repr(self) -> str:
        return (f"{nn.Embedding.extra_repr(self)}, noise={self.noise!r}, alpha={self.alpha}, "
                f"symmetric={self.symmetric}, backend={self.backend!r}, fastnoise-patched")


_PATCHED_CLASSES: dict = {}  # original class -> its patched class


def _base_class(patched: type) -> type:
    for cls in patched.__mro__:
        if _BASE in cls.__dict__:
            return cls.__dict__[_BASE]
    raise TypeError(f"{patched.__name__} is not a fastnoise-patched class")


def patched_class(cls: type) -> type:
    """The class ``(_PatchedEmbedding, cls)``, made once per original class."""
    new = _PATCHED_CLASSES.get(cls)
    if new is None:
        new = type(cls.__name__, (_PatchedEmbedding, cls),
                   {_BASE: cls, "__module__": cls.__module__,
                    "__qualname__": getattr(cls, "__qualname__", cls.__name__)})
        _PATCHED_CLASSES[cls] = new
    return new


_SETTINGS = ("noise", "alpha", "symmetric", "backend", "_fastnoise_embed_scale",
             "_fastnoise_call")


def make_noisy_(embedding: nn.Embedding, *, noise: str, alpha: float, symmetric: bool,
                backend: str) -> nn.Embedding:
    """Give ``embedding`` (the same object) the fused noisy forward; undo with
    :func:`make_plain_`. Reads no weight shape or data (ZeRO-3 placeholders are fine)."""
    if isinstance(embedding, NoisyEmbedding):
        raise ValueError(f"{type(embedding).__name__} already adds noise; patch the model's "
                         "own embedding, not a NoisyEmbedding")
    check_embedding_supported(embedding)
    for name in _SETTINGS:
        if name in embedding.__dict__ or hasattr(type(embedding), name):
            raise ValueError(f"{type(embedding).__name__} already has an attribute {name!r} "
                             "that patching would hide")
    scale = embed_scale_of(embedding)
    embedding.__class__ = patched_class(type(embedding))
    values = dict(noise=noise, alpha=alpha, symmetric=symmetric, backend=backend,
                  _fastnoise_embed_scale=scale)
    embedding.__dict__.update(values)
    settle_early(embedding)
    return embedding


def make_plain_(embedding: nn.Module) -> nn.Module:
    """Undo :func:`make_noisy_`: the original class, the settings gone. A class that wrapped
    the patched one afterwards (FSDP2's ``FSDP<name>``) is rebuilt over the original class."""
    cls = type(embedding)
    base = _base_class(cls)
    if cls is _PATCHED_CLASSES.get(base):
        embedding.__class__ = base
    else:
        embedding.__class__ = _unpatched_wrapper(cls, base)
    for name in _SETTINGS + (_CONTEXT,):
        embedding.__dict__.pop(name, None)
    return embedding


_UNPATCHED_WRAPPERS: dict = {}


def _unpatched_wrapper(cls: type, base: type) -> type:
    patched = _PATCHED_CLASSES.get(base)
    if patched not in cls.__bases__:
        raise TypeError(f"cannot unpatch: the class {cls.__name__} was derived from the patched "
                        "class in a way fastnoise does not know how to undo")
    new = _UNPATCHED_WRAPPERS.get(cls)
    if new is None:
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        new = type(cls.__name__, tuple(base if b is patched else b for b in cls.__bases__),
                   namespace)
        _UNPATCHED_WRAPPERS[cls] = new
    return new
