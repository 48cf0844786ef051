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
from torch import nn

from . import ops
from .backends import REGISTRY_VERSION, BackendUnavailableError, get_backend
from .functional import (check_finite, check_method, check_noise, check_nonnegative,
                         check_padding_idx, noisy_embedding, plain_embedding)

__all__ = ["NoisyEmbedding", "noise_active"]

_BASE = "_fastnoise_base"  # on a patched class: the class it was made from


def noise_active(module: nn.Module) -> bool:
    """The noise rule: training mode and autograd recording."""
    return module.training and torch.is_grad_enabled()


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
        to keep them, use :func:`fastnoise.patch`, which keeps the module object. The model
        still holds ``embedding``: put the new module in (``model.set_input_embeddings(new)``).
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
        weight = self.weight
        # settled once per weight device and dtype (the backend resolved, the error buffer
        # made outside any capture); the op checks the rest
        call = self.__dict__.get("_fastnoise_call")
        if (call is None or call.dtype != weight.dtype or call.device != weight.device
                or call.requested != self.backend or call.version != REGISTRY_VERSION[0]):
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


# --------------------------------------------------------------------------------------
# The patch machinery: fastnoise.patch gives the model's own embedding module (the same
# object) a noisy class; the model's hooks tell it, per model call, which lookup is the
# lookup of the call's input ids
# --------------------------------------------------------------------------------------
class ModelCall:
    """A forward of a patched model (or of an encoder / decoder stack) in flight, as its
    pre-hook (:mod:`fastnoise.integrations`) found it.

    Only the lookup of the call's own ``input_ids`` gets noise: the first lookup inside the
    call whose ids have as many elements. Any other lookup through the embedding (GPT-2's
    ``token_type_ids``; LLaVA's lookup of its image token when called with ``inputs_embeds``)
    is the plain embedding. A call without ids looks nothing up noisily.

    It holds tensors and flags, no sizes: under torch.compile the hooks and the forward are
    separate frames, and a size read from here would be a constant that recompiles the
    forward for every new length.
    """

    def __init__(self, owner, device, ids=None, handed=None, attention_mask=None,
                 position_ids=None, cu_seqlens=None, pair=False):
        self.owner, self.device = owner, device
        self.ids = ids  # as the caller gave them
        self.handed = handed  # as the model got them: a SymNoise pair's cat([ids, ids])
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.cu_seqlens = cu_seqlens
        self.pair = pair
        self.pending = ids is not None  # the input lookup is still to come

    def claims(self, input: torch.Tensor) -> bool:
        """Is this lookup the call's input lookup (the first one with its ids)?"""
        if self.pending and input.numel() == self.handed.numel():
            self.pending = False
            return True
        return False

    def lookup_ids(self, input: torch.Tensor) -> torch.Tensor:
        """The input lookup's ids in the shape the caller gave them (one copy of a pair)."""
        if self.pair:
            return input.reshape(2, -1)[0].reshape(self.ids.shape)
        return input.reshape(self.ids.shape)


#: the patched model calls in flight, innermost last (a list, which torch.compile traces
#: without a graph break, rather than state on the modules, which copies would not share)
CALLS: list = []


def current_call(device: torch.device) -> Optional[ModelCall]:
    """The innermost patched model call on ``device`` (DataParallel runs one per device, in
    threads), else the innermost (a model split over devices); None outside any."""
    for call in reversed(CALLS):
        if call.device == device:
            return call
    return CALLS[-1] if CALLS else None


def _claimed_call(module: nn.Module, input: torch.Tensor):
    """(noisy, call) of a patched module's forward: noise in training mode with autograd on,
    on the current call's input lookup, or on any lookup outside a patched model call."""
    if not noise_active(module):
        return False, None
    call = current_call(input.device)
    if call is not None and not call.claims(input):
        return False, None
    return True, call


def _only_ids(base: type, args, kwargs) -> None:
    if args or kwargs:
        raise TypeError(f"a patched {base.__name__} takes only the ids in a noisy forward, got "
                        f"{len(args)} more positional and {sorted(kwargs)} keyword arguments")


class _Patched:
    """What both patched kinds share: the original class, and pickling (``torch.save`` of the
    model, ``copy.deepcopy``) although the patched class is made at run time."""

    def __reduce_ex__(self, protocol):
        cls = type(self)
        key = (cls.__bases__[0], _base_class(cls))
        reduced = super().__reduce_ex__(protocol)
        if _PATCHED_CLASSES.get(key) is not cls:  # a class derived from it (FSDP2's)
            return reduced
        return (_new_patched, key) + tuple(reduced[2:])


def _new_patched(mixin: type, base: type):
    cls = patched_class(base, mixin)
    return cls.__new__(cls)


class _PatchedEmbedding(_Patched, NoisyEmbedding):
    """The noisy half of a patched class ``type(name, (_PatchedEmbedding, Original), {})``.

    The module object is the model's own (its parameters, buffers, and the hooks FSDP2 or
    DeepSpeed attached to it stay); only its class changes. Noise-free calls, and lookups
    other than the model call's input lookup, run the original class's forward unchanged;
    the input lookup runs the fused kernel, with the original's ``embed_scale`` read once at
    patch time, and the call's mask and packing.
    """

    def forward(self, input, *args, **kwargs):
        base = _base_class(type(self))
        noisy, call = _claimed_call(self, input)
        if not noisy:
            return base.forward(self, input, *args, **kwargs)
        _only_ids(base, args, kwargs)
        scale = self._fastnoise_embed_scale
        if call is None:  # called directly, outside a patched model call: the padded L
            return self._noisy_forward(input, None, None, None, scale)
        out = self._noisy_forward(call.lookup_ids(input), call.attention_mask, call.position_ids,
                                  call.cu_seqlens, scale)
        return out.reshape(*input.shape, out.shape[-1])

    def extra_repr(self) -> str:
        return (f"{nn.Embedding.extra_repr(self)}, noise={self.noise!r}, alpha={self.alpha}, "
                f"symmetric={self.symmetric}, backend={self.backend!r}, fastnoise-patched")


class _PatchedWrapper(_Patched, nn.Module):
    """The noisy half of a patched embedding wrapper that looks rows up itself (PEFT's
    ``TrainableTokensWrapper`` reads a merged weight): its own forward runs, and the noise is
    added to its output rows by the same kernel (each row looked up by its index), with the
    call's mask and packing; a pair is built from one run of the wrapper."""

    def forward(self, input, *args, **kwargs):
        base = _base_class(type(self))
        noisy, call = _claimed_call(self, input)
        if not noisy:
            return base.forward(self, input, *args, **kwargs)
        _only_ids(base, args, kwargs)
        ids = input if call is None else call.lookup_ids(input)
        rows = base.forward(self, ids)
        d = rows.shape[-1]
        index = torch.arange(ids.numel(), device=ids.device).reshape(ids.shape)
        mask, position_ids, cu_seqlens = ((None, None, None) if call is None else
                                          (call.attention_mask, call.position_ids,
                                           call.cu_seqlens))
        out = noisy_embedding(index, rows.reshape(-1, d), noise=self.noise, alpha=self.alpha,
                              symmetric=self.symmetric, attention_mask=mask,
                              position_ids=position_ids, cu_seqlens=cu_seqlens,
                              backend=self.backend)
        return out if call is None else out.reshape(*input.shape, d)

    def extra_repr(self) -> str:
        base = _base_class(type(self)).extra_repr(self)
        return (f"{base + ', ' if base else ''}noise={self.noise!r}, alpha={self.alpha}, "
                f"symmetric={self.symmetric}, backend={self.backend!r}, fastnoise-patched")


_PATCHED_CLASSES: dict = {}  # (noisy half, original class) -> its patched class


def _base_class(patched: type) -> type:
    # a class attribute read, not a walk of the classes' __dict__ mapping proxies, which
    # torch.compile cannot read after the model mutated a dict
    base = getattr(patched, _BASE, None)
    if base is None:
        raise TypeError(f"{patched.__name__} is not a fastnoise-patched class")
    return base


def is_patched_module(module: nn.Module) -> bool:
    return getattr(type(module), _BASE, None) is not None


def patched_class(cls: type, mixin: Optional[type] = None) -> type:
    """The class ``(mixin, cls)`` (``_PatchedEmbedding`` by default), made once per class."""
    mixin = _PatchedEmbedding if mixin is None else mixin
    new = _PATCHED_CLASSES.get((mixin, cls))
    if new is None:
        new = type(cls.__name__, (mixin, cls),
                   {_BASE: cls, "__module__": cls.__module__,
                    "__qualname__": getattr(cls, "__qualname__", cls.__name__)})
        _PATCHED_CLASSES[(mixin, cls)] = new
    return new


_SETTINGS = ("noise", "alpha", "symmetric", "backend", "_fastnoise_embed_scale",
             "_fastnoise_call")


def check_patchable(module: nn.Module, fused: bool = True) -> None:
    """What :func:`make_noisy_` refuses, checked before anything changes."""
    if isinstance(module, NoisyEmbedding) and not is_patched_module(module):
        raise ValueError(f"{type(module).__name__} already adds noise; patch the model's "
                         "own embedding, not a NoisyEmbedding")
    if is_patched_module(module):
        raise ValueError(f"{type(module).__name__} is patched already")
    if fused:
        check_embedding_supported(module)
    for name in _SETTINGS:
        if name in module.__dict__ or hasattr(type(module), name):
            raise ValueError(f"{type(module).__name__} already has an attribute {name!r} "
                             "that patching would hide")


def make_noisy_(module: nn.Module, *, noise: str, alpha: float, symmetric: bool,
                backend: str, fused: bool = True) -> nn.Module:
    """Give ``module`` (the same object) the noisy forward; undo with :func:`make_plain_`.

    ``fused``: an ``nn.Embedding`` whose lookup becomes the fused kernel (no weight shape or
    data is read: ZeRO-3 placeholders are fine); else an embedding wrapper whose output rows
    get the noise (:class:`_PatchedWrapper`)."""
    check_patchable(module, fused)
    values = dict(noise=noise, alpha=alpha, symmetric=symmetric, backend=backend)
    if fused:
        values["_fastnoise_embed_scale"] = embed_scale_of(module)
    module.__class__ = patched_class(type(module), _PatchedEmbedding if fused else
                                     _PatchedWrapper)
    module.__dict__.update(values)
    if fused:
        settle_early(module)
    return module


def make_plain_(module: nn.Module) -> nn.Module:
    """Undo :func:`make_noisy_`: the original class, the settings gone. A class that wrapped
    the patched one afterwards (FSDP2's ``FSDP<name>``) is rebuilt over the original class."""
    cls = type(module)
    base = _base_class(cls)
    if cls in _PATCHED_CLASSES.values():
        module.__class__ = base
    else:
        module.__class__ = _unpatched_wrapper(cls, base)
    for name in _SETTINGS:
        module.__dict__.pop(name, None)
    return module


_UNPATCHED_WRAPPERS: dict = {}


def _unpatched_wrapper(cls: type, base: type) -> type:
    patched = next((b for b in cls.__bases__ if b in _PATCHED_CLASSES.values()
                    and _base_class(b) is base), None)
    if patched is None:
        raise TypeError(f"cannot unpatch: the class {cls.__name__} was derived from the patched "
                        "class in a way fastnoise does not know how to undo")
    new = _UNPATCHED_WRAPPERS.get(cls)
    if new is None:
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        new = type(cls.__name__, tuple(base if b is patched else b for b in cls.__bases__),
                   namespace)
        _UNPATCHED_WRAPPERS[cls] = new
    return new
