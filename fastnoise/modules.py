"""Thin ``nn.Module`` wrappers over :mod:`fastnoise.functional`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import check_method, check_noise, check_nonnegative, noisy_embedding

__all__ = ["NoisyEmbedding"]


def _if_shaped_like(value, input):
    if isinstance(value, torch.Tensor) and value.shape == input.shape:
        return value
    return None


class NoisyEmbedding(nn.Embedding):
    """``nn.Embedding`` that adds NEFTune / Gaussian / SymNoise noise in training mode.

    In eval mode it is exactly ``nn.Embedding``. In training mode it calls
    :func:`fastnoise.noisy_embedding` (one fused kernel on GPU). With ``symmetric=True`` a
    training-mode forward returns twice the batch: ``cat([e + n, e - n])``.

    It is an ``nn.Embedding`` subclass, so code that checks ``isinstance(m, nn.Embedding)``
    (weight init, resizing, tying) keeps working.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, *, noise: str = "uniform",
                 alpha: float = 5.0, symmetric: bool = False, backend: str = "auto",
                 embed_scale: float = 1.0, _weight: Optional[torch.Tensor] = None,
                 device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx,
                         _weight=_weight, device=device, dtype=dtype)
        self.noise = check_noise(noise)
        self.alpha = check_nonnegative("alpha", alpha)
        self.symmetric = bool(symmetric)
        self.backend = backend
        # a scaled embedding (Gemma's sqrt(d)): rows * embed_scale in the weight's dtype
        self.embed_scale = float(embed_scale)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, method: Optional[str] = None,
                       noise: Optional[str] = None, alpha: float = 5.0,
                       symmetric: Optional[bool] = None,
                       backend: str = "auto") -> "NoisyEmbedding":
        """Wrap an existing ``nn.Embedding``, sharing its weight Parameter (ties stay tied).

        ``method`` ("neftune", "gaussian", "symnoise") presets ``noise`` and ``symmetric``;
        explicit ``noise``/``symmetric`` override it. A scaled embedding (transformers'
        Gemma ``*ScaledWordEmbedding``, with an ``embed_scale``) keeps its scale, fused.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding needs an nn.Embedding, got {type(embedding).__name__}")
        unsupported = [name for name, value in (("max_norm", embedding.max_norm is not None),
                                                ("scale_grad_by_freq", embedding.scale_grad_by_freq),
                                                ("sparse", embedding.sparse)) if value]
        if unsupported:
            raise ValueError(f"NoisyEmbedding does not support an embedding with "
                             f"{', '.join(unsupported)} set")
        preset_noise, preset_symmetric = check_method(method) if method else ("uniform", False)
        noise = preset_noise if noise is None else noise
        symmetric = preset_symmetric if symmetric is None else symmetric
        weight = embedding.weight
        scale = getattr(embedding, "embed_scale", 1.0)
        scale = float(scale.item() if isinstance(scale, torch.Tensor) else scale)
        new = cls(weight.shape[0], weight.shape[1], padding_idx=None, noise=noise, alpha=alpha,
                  symmetric=symmetric, backend=backend, embed_scale=scale, _weight=weight)
        new.weight = weight  # the same Parameter object, not a copy
        new.padding_idx = embedding.padding_idx
        new.train(embedding.training)
        return new

    def forward(self, input: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None):
        if not self.training:
            out = F.embedding(input, self.weight, self.padding_idx)
            if self.embed_scale != 1.0:  # exactly what the scaled embedding computes
                out = out * torch.tensor(self.embed_scale, device=out.device).to(out.dtype)
            return out
        # fastnoise.patch puts the model call's mask / packing inputs here for its duration
        context = self.__dict__.get("_fastnoise_context") or {}
        if attention_mask is None:
            attention_mask = _if_shaped_like(context.get("attention_mask"), input)
        if position_ids is None and cu_seqlens is None:
            position_ids = _if_shaped_like(context.get("position_ids"), input)
            cu_seqlens = context.get("cu_seqlens")
            if cu_seqlens is not None and int(cu_seqlens[-1]) != input.numel():
                cu_seqlens = None
        return noisy_embedding(input, self.weight, noise=self.noise, alpha=self.alpha,
                               symmetric=self.symmetric, attention_mask=attention_mask,
                               padding_idx=self.padding_idx, backend=self.backend,
                               position_ids=position_ids, cu_seqlens=cu_seqlens,
                               embed_scale=self.embed_scale)

    def extra_repr(self) -> str:
        scale = f", embed_scale={self.embed_scale}" if self.embed_scale != 1.0 else ""
        return (f"{super().extra_repr()}, noise={self.noise!r}, alpha={self.alpha}, "
                f"symmetric={self.symmetric}, backend={self.backend!r}{scale}")
