"""Hugging Face ``Trainer`` (and TRL) integration: a callback, and the ``neftune_noise_alpha`` key.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[FastNoiseCallback("neftune", alpha=5.0, noisytune_lam=0.15)])

or, for code that already sets ``neftune_noise_alpha`` (``TrainingArguments``, TRL's
``SFTConfig``, axolotl, LLaMA-Factory), one line before the trainer is built:

    fastnoise.override_hf_neftune()        # every Trainer's NEFTune is now fastnoise's, fused
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Optional

from transformers import Trainer, TrainerCallback

from .backends import get_backend, resolve_backend
from .functional import check_method, check_noise, check_nonnegative
from .integrations import _input_embeddings, _unwrap, patch, unpatch
from .noisytune import check_patterns, noisytune_, selected_parameters
from .seeds import check_seed

__all__ = ["FastNoiseCallback", "override_hf_neftune", "restore_hf_neftune"]

logger = logging.getLogger(__name__)
_PATCH_OPTIONS = tuple(name for name, p in inspect.signature(patch).parameters.items()
                       if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _check_patch_options(options: dict) -> dict:
    """The keyword options of :func:`fastnoise.patch`, checked now rather than at train begin."""
    unknown = sorted(set(options) - set(_PATCH_OPTIONS))
    if unknown:
        raise TypeError(f"unknown patch option(s) {unknown}; expected some of {_PATCH_OPTIONS}")
    if options.get("noise") is not None:
        check_noise(options["noise"])
    if options.get("backend", "auto") != "auto":
        get_backend(options["backend"])
    return dict(options)


class FastNoiseCallback(TrainerCallback):
    """Patches the model's input embedding at train begin and restores it at train end;
    with ``noisytune_lam`` set, applies NoisyTune once, before the first step, to the
    parameters ``noisytune_include`` / ``noisytune_exclude`` / ``noisytune_trainable_only``
    select (``fastnoise.noisytune_``'s ``include`` / ``exclude`` / ``trainable_only``).

    Every argument is checked when the callback is built; a conflict with
    ``neftune_noise_alpha`` is reported when the Trainer is built (``on_init_end``) and again
    at train begin before anything is changed. At train begin it logs once, through
    ``Trainer.log`` (so the run's trackers get it): ``fastnoise/method``, ``fastnoise/alpha``,
    ``fastnoise/backend`` and, with NoisyTune, ``fastnoise/noisytune_lambda`` and
    ``fastnoise/noisytune_tensors``.
    """

    def __init__(self, method: Optional[str] = "neftune", alpha: float = 5.0, *,
                 noisytune_lam: Optional[float] = None, seed: Optional[int] = None,
                 noisytune_include=None, noisytune_exclude=None,
                 noisytune_trainable_only: bool = False, **patch_kwargs):
        if method is not None:
            check_method(method)
        self.method, self.alpha = method, check_nonnegative("alpha", alpha)
        self.noisytune_lam = (None if noisytune_lam is None
                              else check_nonnegative("noisytune_lam", noisytune_lam))
        self.seed = check_seed(seed)
        self.patch_kwargs = _check_patch_options(patch_kwargs)
        # NoisyTune's parameter selection, passed through (see fastnoise.noisytune_)
        check_patterns("noisytune_include", noisytune_include)
        check_patterns("noisytune_exclude", noisytune_exclude)
        self.noisytune_selection = {"include": noisytune_include, "exclude": noisytune_exclude,
                                    "trainable_only": bool(noisytune_trainable_only)}
        self._tuned = False
        self.logged: Optional[dict] = None  # what was logged at train begin

    def _check_conflict(self, args) -> None:
        if getattr(args, "neftune_noise_alpha", None) is not None and self.method is not None:
            how = ("fastnoise.override_hf_neftune() is active, so it would patch the model a "
                   "second time" if _OVERRIDE else "the Hugging Face hook would add its noise "
                   "on top of fastnoise's")
            raise ValueError(f"TrainingArguments.neftune_noise_alpha is set and FastNoiseCallback "
                             f"adds noise too: {how}; unset one of them")

    def on_init_end(self, args, state, control, **kwargs):
        self._check_conflict(args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check_conflict(args)  # before anything is changed
        if model is None:
            raise ValueError("FastNoiseCallback needs the Trainer to pass the model")
        logs = {}
        if self.noisytune_lam is not None and not self._tuned and state.global_step == 0:
            logs.update(self._noisytune(model))
        self._tuned = True  # never again, also not when training resumes
        if self.method is not None:
            patch(model, self.method, self.alpha, **self.patch_kwargs)
            logs.update(self._patch_summary(model))
        if logs and self.logged is None:
            self.logged = logs
            _log_through_trainer(logs)

    def _noisytune(self, model) -> dict:
        """NoisyTune, once: the one place it is applied."""
        tensors = len(selected_parameters(model, **self.noisytune_selection))
        noisytune_(model, self.noisytune_lam, seed=self.seed, **self.noisytune_selection)
        return {"fastnoise/noisytune_lambda": self.noisytune_lam,
                "fastnoise/noisytune_tensors": tensors}

    def _patch_summary(self, model) -> dict:
        weight = _input_embeddings(_unwrap(model)).weight
        backend = resolve_backend(self.patch_kwargs.get("backend", "auto"), weight.device,
                                  weight.dtype, op="forward").name
        return {"fastnoise/method": self.method, "fastnoise/alpha": self.alpha,
                "fastnoise/backend": backend}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.method is not None:
            unpatch(model)


def _log_through_trainer(logs: dict) -> None:
    """``Trainer.log(logs)`` of the Trainer whose callback event is running.

    A callback is not handed its Trainer, and the trackers (wandb, TensorBoard, ...) are
    callbacks that only see what ``Trainer.log`` dispatches, so the Trainer is found on the
    call stack (``Trainer.train`` -> ``CallbackHandler`` -> this callback). Outside a Trainer
    the summary goes to this module's logger."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            candidate.log(dict(logs))
            return
        frame = frame.f_back
    logger.info("fastnoise: %s", logs)


# --------------------------------------------------------------------------------------
# neftune_noise_alpha -> fastnoise
# --------------------------------------------------------------------------------------
_OVERRIDE: Optional[dict] = None  # the stock hook functions and our options, while overridden


class _Patched:
    """The handle ``activate_neftune`` returns: the model fastnoise patched."""

    def __init__(self, model):
        self.model = model


def override_hf_neftune(method: str = "neftune", **patch_options) -> None:
    """Make every ``Trainer`` with ``neftune_noise_alpha`` set use fastnoise's fused noise.

    transformers' ``Trainer`` (and every TRL trainer built on it) attaches its NEFTune hook
    with ``transformers.trainer.activate_neftune`` at the start of ``train()`` and removes it
    with ``deactivate_neftune`` at the end; until :func:`restore_hf_neftune`, those become
    :func:`fastnoise.patch` with ``method``, α = ``neftune_noise_alpha`` and ``patch_options``
    (``use_attention_mask``, ``packing``, ``backend``, ...), and :func:`fastnoise.unpatch`.
    Under packing each sequence gets its own L. Calling it again replaces the options.
    """
    global _OVERRIDE
    check_method(method)
    options = _check_patch_options(patch_options)
    import transformers.trainer as hf_trainer

    stock = (_OVERRIDE["stock"] if _OVERRIDE is not None
             else (hf_trainer.activate_neftune, hf_trainer.deactivate_neftune))

    def activate_neftune(model, neftune_noise_alpha, accelerator=None):
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        patch(unwrapped, method, neftune_noise_alpha, **options)
        return _Patched(unwrapped)

    def deactivate_neftune(model, hook_handle, accelerator=None):
        unpatch(hook_handle.model)

    hf_trainer.activate_neftune = activate_neftune
    hf_trainer.deactivate_neftune = deactivate_neftune
    _OVERRIDE = {"stock": stock, "method": method, "options": options}


def restore_hf_neftune() -> bool:
    """Put transformers' stock NEFTune hook back; returns False when it was not overridden."""
    global _OVERRIDE
    if _OVERRIDE is None:
        return False
    import transformers.trainer as hf_trainer

    hf_trainer.activate_neftune, hf_trainer.deactivate_neftune = _OVERRIDE["stock"]
    _OVERRIDE = None
    return True
