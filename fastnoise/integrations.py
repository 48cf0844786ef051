"""Drop-in integration with transformers / PEFT models: ``patch`` and ``unpatch``.

``patch`` keeps the model's own input-embedding module object and changes only its class
(to a subclass of :class:`~fastnoise.NoisyEmbedding` and of the original class), so its
parameters, buffers and every hook attached to it stay: FSDP2's ``fully_shard`` and
DeepSpeed ZeRO-3 gather the weight onto that object, and patching works before or after
either, and before or after DDP wrapping.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from . import modules
from .backends import get_backend

__all__ = ["patch", "unpatch", "is_patched", "PAIRED_INPUTS"]

#: batch-shaped inputs that a symmetric pair doubles along dim 0 with the embeddings, found by
#: name or by position (bound to the model's forward signature)
PAIRED_INPUTS = ("attention_mask", "position_ids", "labels", "shift_labels", "token_type_ids")
_STATE = "_fastnoise_state"  # kept in the embedding's __dict__: neither a submodule nor saved
#: per-token fields of TRL's fused LM-head output (``FusedCausalLMOutput``) that a trainer sums
#: and divides by the un-doubled token count: a symmetric pair is folded back to its mean
_PAIR_MEAN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _unwrap(model: nn.Module) -> nn.Module:
    """DDP / DataParallel wrappers: patch the module they wrap."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _input_embeddings(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); patch works on "
                        "transformers PreTrainedModel and PEFT models (DDP-wrapped or not)")
    return getter()


def is_patched(model: nn.Module) -> bool:
    return _STATE in _input_embeddings(_unwrap(model)).__dict__


def patch(model: nn.Module, method: str = "neftune", alpha: float = 5.0, *,
          noise: Optional[str] = None, symmetric: Optional[bool] = None,
          use_attention_mask: bool = False, packing: bool = True,
          backend: str = "auto") -> nn.Module:
    """Give the model's input embedding the fused noisy forward, in place; returns ``model``.

    The embedding module object stays in the model (its class becomes a subclass of
    :class:`~fastnoise.NoisyEmbedding` and of its own class; :func:`unpatch` restores the
    class). Noise is added only while the model is in training mode and autograd is
    recording (never under ``torch.no_grad()``: DPO reference passes stay clean). Patching a
    patched model replaces the settings (noise is never applied twice).

    With ``use_attention_mask=True`` the ``attention_mask`` the model is called with gives each
    sequence its own length and no noise on padding (the NEFTune authors' code); by default L
    is the padded length (the Hugging Face hook). With ``packing`` (the default), a call with
    ``position_ids`` that restart at 0, or with flash-attention's ``cu_seq_lens_q``, gives each
    packed sequence its own L (the fix the Hugging Face hook lacks, transformers issue #34659).
    Inputs are found by keyword or by position (bound to the model's ``forward`` signature).

    With a symmetric method the batch doubles inside the model: the batch-shaped inputs in
    :data:`PAIRED_INPUTS` are doubled too (``cu_seq_lens_q/k`` get the second copy's
    boundaries) and ``num_items_in_batch`` (the token count Trainer passes) is doubled, so the
    loss is the mean per-token loss over the pair, as the unpatched model gives on the doubled
    batch. TRL's fused LM-head outputs (``log_probs`` ...) are folded back to the mean of the
    pair, so SFT/DPO losses computed from them by the trainer are that mean too.
    """
    model = _unwrap(model)
    if is_patched(model):
        unpatch(model)
    embedding = _input_embeddings(model)
    noise, alpha, symmetric = modules.resolve_settings(method, noise, alpha, symmetric)
    if backend != "auto":
        get_backend(backend)  # an unknown name fails now, not at the first step
    config = getattr(model, "config", None)
    if symmetric and getattr(config, "is_encoder_decoder", False):
        # the shared embedding would double the decoder's inputs a second time
        raise ValueError("symmetric noise (SymNoise pairs) is not supported on "
                         "encoder-decoder models; use symmetric=False")
    # the input embedding, and the modules that share its weight Parameter (transformers 5's
    # T5/BART encoder and decoder each hold their own module tied to the shared one)
    targets = [embedding] + [m for m in model.modules()
                             if m is not embedding and isinstance(m, nn.Embedding)
                             and not isinstance(m, modules.NoisyEmbedding)
                             and m.__dict__.get("_parameters", {}).get("weight") is not None
                             and m.weight is embedding.weight]
    context = {}
    for target in targets:
        modules.make_noisy_(target, noise=noise, alpha=alpha, symmetric=symmetric,
                            backend=backend)
        target.__dict__[modules._CONTEXT] = context
    pre = model.register_forward_pre_hook(
        _make_pre_hook(embedding, context, use_attention_mask, packing), with_kwargs=True)
    post = model.register_forward_hook(_make_post_hook(context))
    embedding.__dict__[_STATE] = {"hooks": (pre, post), "modules": targets}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the embedding's original class (the same object); a no-op when unpatched."""
    unwrapped = _unwrap(model)
    embedding = _input_embeddings(unwrapped)
    state = embedding.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for handle in state["hooks"]:
        handle.remove()
    for target in state["modules"]:
        modules.make_plain_(target)
    return model


# --------------------------------------------------------------------------------------
# The model-level hooks: find the batch inputs, double them for a symmetric pair
# --------------------------------------------------------------------------------------
_SIGNATURES: dict = {}


def _bind(module: nn.Module, args, kwargs) -> Optional[inspect.BoundArguments]:
    """The call bound to ``module.forward``'s signature; None when it does not bind (the
    model call itself then raises its own TypeError)."""
    forward = module.forward
    key = getattr(forward, "__func__", forward)
    signature = _SIGNATURES.get(key)
    if signature is None:
        signature = _SIGNATURES[key] = inspect.signature(forward)
    try:
        return signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None


class _Arguments:
    """Read and replace arguments of a bound call, whether named parameters or ``**kwargs``."""

    def __init__(self, bound: inspect.BoundArguments):
        self.bound = bound
        self.var_keyword = next((p.name for p in bound.signature.parameters.values()
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    def _holder(self, name):
        params = self.bound.signature.parameters
        if name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD:
            return self.bound.arguments
        if self.var_keyword is not None:
            return self.bound.arguments.setdefault(self.var_keyword, {})
        return None

    def get(self, name):
        holder = self._holder(name)
        return None if holder is None else holder.get(name)

    def set(self, name, value):
        self._holder(name)[name] = value

    def call(self):
        return self.bound.args, self.bound.kwargs


def _double(name: str, value):
    if name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        # flash-attention varlen boundaries over the flattened batch: the copy follows
        return torch.cat([value, value[1:] + value[-1]])
    return torch.cat([value, value])


def _make_pre_hook(embedding: nn.Module, context: dict, use_attention_mask: bool,
                   packing: bool):
    def hook(module, args, kwargs):
        context.clear()
        if not (module.training and modules.noise_active(embedding)):
            return None
        bound = _bind(module, args, kwargs)
        if bound is None:
            return None
        call = _Arguments(bound)
        if use_attention_mask and isinstance(call.get("attention_mask"), torch.Tensor):
            context["attention_mask"] = call.get("attention_mask")
        if packing:
            for ours, theirs in (("position_ids", "position_ids"),
                                 ("cu_seqlens", "cu_seq_lens_q")):
                if isinstance(call.get(theirs), torch.Tensor):
                    context[ours] = call.get(theirs)
        if not embedding.symmetric or isinstance(call.get("inputs_embeds"), torch.Tensor):
            return None  # no pair (the embedding is not called with inputs_embeds)
        ids = call.get("input_ids")
        context["pair_batch"] = ids.shape[0] if isinstance(ids, torch.Tensor) else None
        for name in PAIRED_INPUTS + ("cu_seq_lens_q", "cu_seq_lens_k"):
            value = call.get(name)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                call.set(name, _double(name, value))
        count = call.get("num_items_in_batch")
        if count is not None:
            call.set("num_items_in_batch", count * 2)
        return call.call()

    return hook


def _make_post_hook(context: dict):
    def hook(module, args, output):
        batch = context.get("pair_batch")
        context.clear()
        if batch is None or not hasattr(output, "keys") or "log_probs" not in output.keys():
            return None
        for name in _PAIR_MEAN_FIELDS:  # TRL's FusedCausalLMOutput: fold the pair to its mean
            value = output.get(name)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2 * batch:
                output[name] = (value[:batch].to(torch.float32 if not value.is_floating_point()
                                                 else value.dtype)
                                + value[batch:]) / 2
        mask = output.get("label_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() > 0 and mask.shape[0] == 2 * batch:
            output["label_mask"] = mask[:batch]  # the halves' labels are the same
        return output

    return hook
