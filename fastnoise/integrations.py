"""Drop-in integration with transformers / PEFT models: ``patch`` and ``unpatch``.

``patch`` keeps the model's own input-embedding module object and changes only its class
(to a subclass of :class:`~fastnoise.NoisyEmbedding` and of the original class), so its
parameters, buffers and every hook attached to it stay: FSDP2's ``fully_shard`` and
DeepSpeed ZeRO-3 gather the weight onto that object, and patching works before or after
either, and before or after DDP wrapping.

Forward hooks on the model (on an encoder-decoder, on its encoder and its decoder) tell the
embedding, per call, which lookup is the lookup of the call's ``input_ids`` and with which
mask and packing (:class:`fastnoise.modules.ModelCall`); for a SymNoise pair they hand the
model its batch twice. The hooks are plain objects, so a deep copy or a pickle of a patched
model is a patched model whose hooks point at the copy, and torch.compile traces them.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import modules
from .backends import get_backend

__all__ = ["patch", "unpatch", "is_patched", "PAIRED_INPUTS"]

#: batch-shaped inputs a SymNoise pair hands the model twice (``cat([x, x])`` along dim 0),
#: found by name or by position (bound to the model's forward signature); the model then
#: builds whatever else it needs (token types, position ids, masks) for the doubled batch
PAIRED_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels", "shift_labels",
                 "token_type_ids", "pixel_values", "image_sizes")
#: flash-attention varlen boundaries over the flattened batch: the copy's follow the first's
_VARLEN_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k")
#: per-token fields of TRL's fused LM-head output (``FusedCausalLMOutput``) that a trainer sums
#: and divides by the un-doubled token count: a SymNoise pair is folded back to its mean
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
    return any(modules.is_patched_module(m) for m in _unwrap(model).modules())


def patch(model: nn.Module, method: str = "neftune", alpha: float = 5.0, *,
          noise: Optional[str] = None, symmetric: Optional[bool] = None,
          use_attention_mask: bool = False, packing: bool = True,
          backend: str = "auto") -> nn.Module:
    """Give the model's input embedding the fused noisy forward, in place; returns ``model``.

    The embedding module object stays in the model (its class becomes a subclass of
    :class:`~fastnoise.NoisyEmbedding` and of its own class; :func:`unpatch` restores the
    class). Noise is added only while the model is in training mode and autograd is
    recording (never under ``torch.no_grad()``: DPO reference passes stay clean), and only
    to the lookup of the ``input_ids`` the model is called with (not to GPT-2's token types,
    nor to a lookup a model makes when called with ``inputs_embeds``); a direct call of the
    embedding outside a model call gets noise as a ``NoisyEmbedding`` does. Patching a
    patched model replaces the settings (noise is never applied twice).

    With ``use_attention_mask=True`` the ``attention_mask`` the model is called with gives each
    sequence its own length and no noise on padding (the NEFTune authors' code); by default L
    is the padded length (the Hugging Face hook). With ``packing`` (the default), a call with
    ``position_ids`` that restart at 0 (shaped like the ids, or (1, L) for every row), or
    with flash-attention's ``cu_seq_lens_q``, gives each packed sequence its own L (the fix
    the Hugging Face hook lacks, transformers issue #34659). An encoder-decoder takes each
    stack's own ids, mask and packing. Inputs are found by keyword or by position (bound to
    the model's ``forward`` signature).

    With a symmetric method (SymNoise) the model is handed its batch twice: the inputs in
    :data:`PAIRED_INPUTS` (the ids first) are doubled along dim 0 (``cu_seq_lens_q/k`` get
    the second copy's boundaries) and ``num_items_in_batch`` (the token count Trainer
    passes) is doubled, and the embedding turns the doubled ids into ``e + n`` and ``e - n``.
    So the loss is the mean per-token loss over the pair, as the unpatched model gives on
    the doubled batch. TRL's fused LM-head outputs (``log_probs`` ...) are folded back to the
    mean of the pair (``is_top1``: top-1 in both), so SFT/DPO/KTO losses computed from them
    are that mean too. Outputs the caller splits by batch itself (logits) stay doubled.

    The embedding can be an ``nn.Embedding`` (fused), PEFT's ``ModulesToSaveWrapper`` (the
    embeddings it holds are patched, fused) or PEFT's ``TrainableTokensWrapper`` (the noise is
    added to its output rows, by the same kernel). Every check runs before anything changes.
    """
    model = _unwrap(model)
    noise, alpha, symmetric = modules.resolve_settings(method, noise, alpha, symmetric)
    if backend != "auto":
        get_backend(backend)  # an unknown name fails now, not at the first step
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if symmetric and encoder_decoder:
        # the pair would need the decoder's inputs doubled with the encoder's
        raise ValueError("symmetric noise (SymNoise pairs) is not supported on "
                         "encoder-decoder models; use symmetric=False")
    if is_patched(model):
        unpatch(model)
    embedding = _input_embeddings(model)
    targets = _targets(model, embedding)
    stacks = [model.get_encoder(), model.get_decoder()] if encoder_decoder else [model]
    hooks = [_ModelHook(embedding, stack.forward, symmetric, use_attention_mask, packing)
             for stack in stacks]
    for target, fused in targets:
        modules.make_noisy_(target, noise=noise, alpha=alpha, symmetric=symmetric,
                            backend=backend, fused=fused)
    for stack, hook in zip(stacks, hooks):
        stack.register_forward_pre_hook(hook.before, with_kwargs=True)
        stack.register_forward_hook(hook.after, with_kwargs=True, always_call=True)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes (the same objects) and remove the hooks ``patch`` added,
    wherever they are in the model (copies PEFT made of a patched embedding included); a
    no-op when unpatched."""
    for module in _unwrap(model).modules():
        _remove_hooks(module)
        if modules.is_patched_module(module):
            modules.make_plain_(module)
    return model


def _peft_wrappers():
    try:
        from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper
    except ImportError:
        return (), ()
    return (ModulesToSaveWrapper,), (TrainableTokensWrapper,)


def _targets(model: nn.Module, embedding: nn.Module) -> List[Tuple[nn.Module, bool]]:
    """(module, fused) of every module ``patch`` changes, all checked before any changes."""
    modules_to_save, trainable_tokens = _peft_wrappers()
    if isinstance(embedding, nn.Embedding):
        roots, wrappers = [embedding], []
    elif isinstance(embedding, modules_to_save):
        # PEFT's modules_to_save: the frozen original and each adapter's trained copy
        roots, wrappers = [embedding.original_module, *embedding.modules_to_save.values()], []
        odd = [type(m).__name__ for m in roots if not isinstance(m, nn.Embedding)]
        if odd:
            raise TypeError(f"fastnoise needs nn.Embedding modules in PEFT's "
                            f"ModulesToSaveWrapper, got {odd}")
    elif isinstance(embedding, trainable_tokens):
        # PEFT's trainable_token_indices: its training forward reads a merged weight
        roots, wrappers = [], [embedding]
    else:
        raise TypeError(f"fastnoise needs an nn.Embedding (or PEFT's ModulesToSaveWrapper or "
                        f"TrainableTokensWrapper around one), got {type(embedding).__name__}")
    # the modules that share a root's weight Parameter (transformers 5's T5/BART encoder and
    # decoder each hold their own module tied to the shared one)
    tied = [m for m in model.modules()
            if isinstance(m, nn.Embedding) and all(m is not r for r in roots)
            and not isinstance(m, modules.NoisyEmbedding)
            and m.__dict__.get("_parameters", {}).get("weight") is not None
            and any(m.weight is r.weight for r in roots)]
    targets = [(m, True) for m in roots + tied] + [(m, False) for m in wrappers]
    for module, fused in targets:
        modules.check_patchable(module, fused)
        _check_no_stock_hook(module)
    return targets


def _check_no_stock_hook(module: nn.Module) -> None:
    for hook in module._forward_hooks.values():
        if getattr(hook, "__name__", "") == "neftune_post_forward_hook" and \
                getattr(hook, "__module__", "").startswith("transformers"):
            raise ValueError(f"{type(module).__name__} has transformers' NEFTune hook attached "
                             "(neftune_noise_alpha): its noise would add to fastnoise's. "
                             "Remove it first (trainer.neftune_hook_handle.remove()), or use "
                             "fastnoise.override_hf_neftune()")


def _remove_hooks(module: nn.Module) -> None:
    """Remove the hooks of :class:`_ModelHook` objects (what RemovableHandle.remove does, found
    by kind: a copied or unpickled model holds no handle of ours)."""
    for hooks, extras in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                          (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                   module._forward_hooks_always_called))):
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), _ModelHook):
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)


# --------------------------------------------------------------------------------------
# The model-level hooks
# --------------------------------------------------------------------------------------
class _ModelHook:
    """``patch``'s forward hooks on a model (on an encoder-decoder, on each stack).

    Before the call: find its ids, mask and packing inputs (by name or by position), check
    them, hand the model a SymNoise pair's batch twice, and push the
    :class:`~fastnoise.modules.ModelCall` the embedding reads. After it (also when the
    forward raised): pop the call; check that its input lookup happened (else the noise
    would be silently missing); fold TRL's fused outputs of a pair.
    """

    def __init__(self, embedding: nn.Module, forward, symmetric: bool,
                 use_attention_mask: bool, packing: bool):
        self.embedding = embedding  # the model's input embedding: its mode
        self.symmetric, self.use_attention_mask, self.packing = (symmetric, use_attention_mask,
                                                                 packing)
        self._bind(forward)

    def _bind(self, forward) -> None:
        """Position of each parameter that can be passed positionally, read once."""
        self._function = getattr(forward, "__func__", forward)
        self.positions = {}
        for p in inspect.signature(forward).parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                self.positions[p.name] = len(self.positions)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_function"] = None  # functions of closures do not pickle; re-read when needed
        return state

    def _get(self, args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        index = self.positions.get(name)
        return args[index] if index is not None and index < len(args) else None

    def _set(self, args: list, kwargs: dict, name, value) -> None:
        index = self.positions.get(name)
        if name not in kwargs and index is not None and index < len(args):
            args[index] = value
        else:
            kwargs[name] = value

    def before(self, module, args, kwargs):
        _pop_call(module)  # one left by a call that raised before its hooks ended
        if not (module.training and modules.noise_active(self.embedding)):
            return None
        if args and getattr(module.forward, "__func__", module.forward) is not self._function:
            self._bind(module.forward)  # the forward was replaced (TRL's fused LM head)
        ids = self._get(args, kwargs, "input_ids")
        embeds = self._get(args, kwargs, "inputs_embeds")
        if not isinstance(ids, torch.Tensor) or isinstance(embeds, torch.Tensor):
            # no lookup of ids in this call is the input lookup (LLaVA's image token)
            device = embeds.device if isinstance(embeds, torch.Tensor) else None
            modules.CALLS.append(modules.ModelCall(module, device))
            return None
        mask = self._mask(args, kwargs, ids) if self.use_attention_mask else None
        position_ids = cu_seqlens = None
        if self.packing:
            cu_seqlens = self._get(args, kwargs, "cu_seq_lens_q")
            if not isinstance(cu_seqlens, torch.Tensor):
                # a varlen call carries both; its boundaries are the exact ones
                cu_seqlens = None
                position_ids = self._position_ids(args, kwargs, ids)
        if not self.symmetric:
            modules.CALLS.append(modules.ModelCall(module, ids.device, ids, ids, mask,
                                                   position_ids, cu_seqlens))
            return None
        args, kwargs = list(args), dict(kwargs)  # new containers: the caller's stay as given
        modules.CALLS.append(modules.ModelCall(module, ids.device, ids, torch.cat([ids, ids]),
                                               mask, position_ids, cu_seqlens, pair=True))
        self._set(args, kwargs, "input_ids", modules.CALLS[-1].handed)
        for name in PAIRED_INPUTS[1:]:
            value = self._get(args, kwargs, name)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                self._set(args, kwargs, name, torch.cat([value, value]))
        for name in _VARLEN_INPUTS:
            value = self._get(args, kwargs, name)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                self._set(args, kwargs, name, torch.cat([value, value[1:] + value[-1]]))
        count = self._get(args, kwargs, "num_items_in_batch")
        if count is not None:
            self._set(args, kwargs, "num_items_in_batch", count * 2)
        return tuple(args), kwargs

    def _mask(self, args, kwargs, ids):
        mask = self._get(args, kwargs, "attention_mask")
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"patch(use_attention_mask=True) takes each row's length from a "
                             f"(batch, length) attention_mask shaped like input_ids "
                             f"{tuple(ids.shape)}, got {shape}; pass use_attention_mask=False "
                             "to use the padded length")
        return mask

    def _position_ids(self, args, kwargs, ids):
        position_ids = self._get(args, kwargs, "position_ids")
        if not isinstance(position_ids, torch.Tensor):
            return None
        if position_ids.shape != ids.shape:
            # one row of positions for every row of ids (the model broadcasts it)
            if ids.dim() == 0 or position_ids.shape[-1:] != ids.shape[-1:] or \
                    position_ids.dim() > ids.dim() or position_ids.numel() != ids.shape[-1]:
                raise ValueError(f"packing reads sequence starts from position_ids shaped like "
                                 f"input_ids {tuple(ids.shape)} (or one row for all), got "
                                 f"{tuple(position_ids.shape)}; pass packing=False to use "
                                 "the padded length")
            position_ids = position_ids.reshape(ids.shape[-1]).expand(ids.shape)
        return position_ids

    def after(self, module, args, kwargs, output):
        call = _pop_call(module)
        if call is None or output is None:  # not noisy, or the forward raised
            return None
        if call.pending:
            raise RuntimeError(
                f"fastnoise: {type(module).__name__} was called with input_ids in training "
                "but no fastnoise-patched embedding looked them up, so they got no noise (was "
                "the embedding replaced or wrapped after patch, e.g. by PEFT's "
                "trainable_token_indices? call fastnoise.patch after wrapping)")
        if call.pair:
            return _fold_pair(output, call.ids.shape[0])
        return None


def _pop_call(module: nn.Module):
    calls = modules.CALLS
    for index in range(len(calls) - 1, -1, -1):
        if calls[index].owner is module:
            return calls.pop(index)
    return None


def _fold_pair(output, batch: int):
    """TRL's FusedCausalLMOutput of a pair: each per-token field back to the pair's mean."""
    if not hasattr(output, "keys") or "log_probs" not in output.keys():
        return None
    for name in _PAIR_MEAN_FIELDS:
        value = output.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2 * batch:
            first, second = value[:batch], value[batch:]
            # a boolean field (is_top1) stays boolean: true where it holds in both halves
            output[name] = first & second if value.dtype == torch.bool else (first + second) / 2
    mask = output.get("label_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() > 0 and mask.shape[0] == 2 * batch:
        output["label_mask"] = mask[:batch]  # the halves' labels are the same
    return output
