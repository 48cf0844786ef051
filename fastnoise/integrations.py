"""Drop-in integration with transformers / PEFT models: ``patch`` and ``unpatch``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .modules import NoisyEmbedding

__all__ = ["patch", "unpatch", "is_patched"]

#: batch-shaped keyword inputs that a symmetric pair must double along with the embeddings
PAIRED_INPUTS = ("attention_mask", "position_ids", "labels", "token_type_ids")
_STATE = "_fastnoise_state"  # kept in __dict__, so it is neither a submodule nor saved


def _input_embeddings(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); patch works on "
                        "transformers PreTrainedModel and PEFT models")
    return getter()


def is_patched(model: nn.Module) -> bool:
    return _STATE in _input_embeddings(model).__dict__


def patch(model: nn.Module, method: str = "neftune", alpha: float = 5.0, *,
          noise: Optional[str] = None, symmetric: Optional[bool] = None,
          use_attention_mask: bool = False, packing: bool = True,
          backend: str = "auto") -> nn.Module:
    """Swap the model's input embedding for a :class:`NoisyEmbedding`; returns the model.

    The weight Parameter is shared (tied output embeddings stay tied). Noise is added only
    while the model is in training mode. Patching a patched model replaces the settings
    (noise is never applied twice). With ``use_attention_mask=True`` the ``attention_mask``
    the model is called with gives each sequence its own length and no noise on padding
    (the NEFTune authors' code); by default L is the padded length (the Hugging Face hook).
    With ``packing`` (the default), a call with ``position_ids`` that restart at 0, or with
    flash-attention's ``cu_seq_lens_q``, gives each packed sequence its own L (the fix the
    Hugging Face hook lacks, transformers issue #34659); plain ``arange`` position ids change
    nothing.
    With a symmetric method the batch doubles inside the model: the batch-shaped inputs in
    :data:`PAIRED_INPUTS` are doubled too, so ``model(**batch).loss`` is the mean loss of
    the pair.
    """
    if is_patched(model):
        unpatch(model)
    original = _input_embeddings(model)
    noisy = NoisyEmbedding.from_embedding(original, method=method, noise=noise, alpha=alpha,
                                          symmetric=symmetric, backend=backend)
    config = getattr(model, "config", None)
    if noisy.symmetric and getattr(config, "is_encoder_decoder", False):
        # the shared embedding would double the decoder's inputs a second time
        raise ValueError("symmetric noise (SymNoise pairs) is not supported on "
                         "encoder-decoder models; use symmetric=False")
    noisy.train(model.training)
    context = {}
    pre = model.register_forward_pre_hook(
        _make_pre_hook(noisy, context, use_attention_mask, packing), with_kwargs=True)
    post = model.register_forward_hook(lambda module, args, output: context.clear())
    noisy.__dict__[_STATE] = {"original": original, "hooks": (pre, post), "context": context}
    model.set_input_embeddings(noisy)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original embedding module object; a no-op on an unpatched model."""
    noisy = _input_embeddings(model)
    state = noisy.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for handle in state["hooks"]:
        handle.remove()
    original = state["original"]
    original.train(model.training)
    model.set_input_embeddings(original)
    return model


def _make_pre_hook(noisy: NoisyEmbedding, context: dict, use_attention_mask: bool,
                   packing: bool):
    def hook(module, args, kwargs):
        if not (module.training and noisy.training):
            return None
        if use_attention_mask and isinstance(kwargs.get("attention_mask"), torch.Tensor):
            context["attention_mask"] = kwargs["attention_mask"]
        if packing:
            for ours, theirs in (("position_ids", "position_ids"), ("cu_seqlens", "cu_seq_lens_q")):
                if isinstance(kwargs.get(theirs), torch.Tensor):
                    context[ours] = kwargs[theirs]
        if not noisy.symmetric:
            return None
        doubled = dict(kwargs)
        for name in PAIRED_INPUTS:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                doubled[name] = torch.cat([value, value])
        return args, doubled

    noisy.__dict__["_fastnoise_context"] = context
    return hook
