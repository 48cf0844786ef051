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
from collections import Counter
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from .backends import get_backend, resolve_backend
from .functional import check_method, check_noise, check_nonnegative
from .integrations import _input_embeddings, _unwrap, patch, unpatch
from .modules import resolve_settings
from .noisytune import check_patterns, noisytune_, selected_parameters, unchanged_parameters
from .seeds import check_seed

__all__ = ["FastNoiseCallback", "NEFTuneHandle", "override_hf_neftune", "restore_hf_neftune"]

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
    ``fastnoise/backend`` and, with NoisyTune, ``fastnoise/noisytune_lambda``,
    ``fastnoise/noisytune_perturbed`` (the tensors it changed) and
    ``fastnoise/noisytune_skipped_std_0``, ``..._skipped_numel_lt_2``,
    ``..._skipped_not_finite``, ``..._skipped_lam_0`` (selected tensors it left as they were,
    and why; a std of 0 is what RMSNorm weights have at init).

    A SymNoise pair doubles the batch inside the model: at train begin the Trainer's loss
    must be one fastnoise knows is computed on the doubled batch (``Trainer``'s own, TRL's
    SFT, DPO and KTO trainers), else it raises before anything changes; a loss the Trainer
    computes outside the model from the labels it popped (``label_smoothing_factor``,
    ``compute_loss_func``) gets the labels doubled, for the run.
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
        self._restore_losses = None
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
        symmetric = self.method is not None and resolve_settings(
            self.method, self.patch_kwargs.get("noise"), self.alpha,
            self.patch_kwargs.get("symmetric"))[2]
        if symmetric:  # checked before NoisyTune or the patch change anything
            self._restore_losses = prepare_trainer_for_pair(_running_trainer())
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
        selected = len(selected_parameters(model, **self.noisytune_selection))
        unchanged = unchanged_parameters(model, self.noisytune_lam, **self.noisytune_selection)
        noisytune_(model, self.noisytune_lam, seed=self.seed,
                   backend=self.patch_kwargs.get("backend", "auto"), **self.noisytune_selection)
        why = Counter(reason for _, reason in unchanged)
        logs = {"fastnoise/noisytune_lambda": self.noisytune_lam,
                "fastnoise/noisytune_perturbed": selected - len(unchanged)}
        for reason, key in _SKIP_KEYS.items():
            logs[f"fastnoise/noisytune_skipped_{key}"] = why[reason]
        if why["not finite"]:
            logger.warning("fastnoise: NoisyTune left %d tensors with NaN or inf elements "
                           "unchanged: %s", why["not finite"],
                           [name for name, reason in unchanged if reason == "not finite"][:5])
        return logs

    def _patch_summary(self, model) -> dict:
        weight = _input_embeddings(_unwrap(model)).weight
        backend = resolve_backend(self.patch_kwargs.get("backend", "auto"), weight.device,
                                  weight.dtype, op="forward").name
        return {"fastnoise/method": self.method, "fastnoise/alpha": self.alpha,
                "fastnoise/backend": backend}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.method is not None:
            unpatch(model)
        if self._restore_losses is not None:
            self._restore_losses()
            self._restore_losses = None


_SKIP_KEYS = {"std 0": "std_0", "numel < 2": "numel_lt_2", "not finite": "not_finite",
              "lam 0": "lam_0"}


# --------------------------------------------------------------------------------------
# SymNoise under a Trainer: the loss must be that of the doubled batch
# --------------------------------------------------------------------------------------
def _pair_verified_losses() -> dict:
    """compute_loss functions known to compute the loss on the doubled batch: the model's
    own (Trainer), or from TRL's fused per-token outputs that patch folds to the pair's mean."""
    verified = {Trainer.compute_loss: "Trainer"}
    try:
        from trl import DPOTrainer, KTOTrainer, SFTTrainer
    except ImportError:
        return verified
    for cls in (SFTTrainer, DPOTrainer, KTOTrainer):
        verified[cls.compute_loss] = cls.__name__
    return verified


class _PairLoss:
    """A loss the Trainer computes outside the model from the labels it popped (label
    smoothing, ``compute_loss_func``): the outputs of a SymNoise pair are the doubled batch,
    so the labels and the token count are doubled to match (the mean over the pair)."""

    def __init__(self, loss):
        self.loss = loss

    def __getattr__(self, name):  # LabelSmoother's epsilon, ignore_index
        return getattr(self.__dict__["loss"], name)

    def __call__(self, outputs, labels, *args, num_items_in_batch=None, **kwargs):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if isinstance(labels, torch.Tensor) and labels.dim() > 0 and \
                isinstance(logits, torch.Tensor) and logits.shape[0] == 2 * labels.shape[0]:
            labels = torch.cat([labels, labels])
            if num_items_in_batch is not None:
                num_items_in_batch = num_items_in_batch * 2
        return self.loss(outputs, labels, *args, num_items_in_batch=num_items_in_batch,
                         **kwargs)


def prepare_trainer_for_pair(trainer):
    """Check that ``trainer`` computes its loss on a SymNoise pair's doubled batch, and wrap
    the losses it computes outside the model; returns the undo (None without a Trainer)."""
    if trainer is None:
        return None
    verified = _pair_verified_losses()
    if type(trainer).compute_loss not in verified:
        raise ValueError(
            f"SymNoise doubles the batch inside the model, and {type(trainer).__name__}'s "
            f"compute_loss is not one fastnoise knows computes the loss on the doubled batch "
            f"({', '.join(sorted(set(verified.values())))}; ORPO, CPO and reward trainers "
            f"split the logits by batch themselves). Use method='neftune' or 'gaussian', or "
            f"fastnoise.patch the model and compute the loss on the doubled batch yourself")
    wrapped = {}
    for name in ("label_smoother", "compute_loss_func"):
        loss = getattr(trainer, name, None)
        if loss is not None and not isinstance(loss, _PairLoss):
            wrapped[name] = loss
            setattr(trainer, name, _PairLoss(loss))

    def restore():
        for name, loss in wrapped.items():
            setattr(trainer, name, loss)

    return restore


def _running_trainer() -> Optional[Trainer]:
    """The Trainer whose train() is on the call stack (a callback is not handed it)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _log_through_trainer(logs: dict) -> None:
    """``Trainer.log(logs)`` of the Trainer whose callback event is running.

    A callback is not handed its Trainer, and the trackers (wandb, TensorBoard, ...) are
    callbacks that only see what ``Trainer.log`` dispatches, so the Trainer is found on the
    call stack (``Trainer.train`` -> ``CallbackHandler`` -> this callback). Outside a Trainer
    the summary goes to this module's logger."""
    trainer = _running_trainer()
    if trainer is not None:
        trainer.log(dict(logs))
    else:
        logger.info("fastnoise: %s", logs)


# --------------------------------------------------------------------------------------
# neftune_noise_alpha -> fastnoise
# --------------------------------------------------------------------------------------
_OVERRIDE: Optional[dict] = None  # the stock hook functions and our options, while overridden
#: every public home of the stock functions in transformers 5 (transformers/integrations/
#: neftune.py, re-exported by transformers.integrations; Trainer calls transformers.trainer's)
_NEFTUNE_HOMES = ("transformers.integrations.neftune", "transformers.integrations",
                  "transformers.trainer")
_NEFTUNE_NAMES = ("activate_neftune", "deactivate_neftune")


def _neftune_embeddings(model):
    """The module the stock hook sets ``neftune_noise_alpha`` on (its own rule)."""
    from transformers.trainer_utils import _is_peft_model
    if _is_peft_model(model):
        return model.base_model.model.get_input_embeddings()
    return model.get_input_embeddings()


class NEFTuneHandle:
    """What the overridden ``activate_neftune`` returns where the stock one returns its
    forward hook's ``RemovableHandle``: ``remove()`` unpatches the model and deletes
    ``neftune_noise_alpha`` (once; again is a no-op, as with RemovableHandle), so
    ``trainer.neftune_hook_handle.remove()`` and ``deactivate_neftune`` work as with the
    stock hook. Also a context manager."""

    def __init__(self, model, method: str, alpha: float, options: dict):
        symmetric = resolve_settings(method, options.get("noise"), alpha,
                                     options.get("symmetric"))[2]
        # the Trainer's loss is checked before anything changes
        restore_losses = prepare_trainer_for_pair(_running_trainer()) if symmetric else None
        try:
            patch(model, method, alpha, **options)
        except BaseException:
            if restore_losses is not None:
                restore_losses()
            raise
        self.model, self._restore_losses = model, restore_losses
        self.embeddings = _neftune_embeddings(model)
        self.embeddings.neftune_noise_alpha = alpha  # as the stock hook sets it

    def remove(self) -> None:
        if self.model is None:
            return
        unpatch(self.model)
        if "neftune_noise_alpha" in self.embeddings.__dict__:
            del self.embeddings.neftune_noise_alpha
        if self._restore_losses is not None:
            self._restore_losses()
        self.model = self._restore_losses = None

    def __enter__(self) -> "NEFTuneHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def override_hf_neftune(method: str = "neftune", **patch_options) -> None:
    """Make every ``Trainer`` with ``neftune_noise_alpha`` set use fastnoise's fused noise.

    transformers' ``Trainer`` (and every TRL trainer built on it) attaches its NEFTune hook
    with ``activate_neftune`` at the start of ``train()`` and removes it with
    ``deactivate_neftune`` at the end. Until :func:`restore_hf_neftune`, every public name of
    the two (in ``transformers.integrations.neftune``, ``transformers.integrations`` and
    ``transformers.trainer``: the transformers 5 layout; another raises ``ImportError``) is
    fastnoise's: :func:`fastnoise.patch` with ``method``, alpha = ``neftune_noise_alpha`` and
    ``patch_options`` (``use_attention_mask``, ``packing``, ``backend``, ...), returning a
    :class:`NEFTuneHandle` whose ``remove()`` unpatches, with ``neftune_noise_alpha`` set on
    the embeddings as the stock hook sets it. Under packing each sequence gets its own L.
    Not reached: a reference bound before this call (``from transformers.integrations.neftune
    import activate_neftune`` run earlier) keeps the stock function; and the stock
    ``neftune_post_forward_hook`` registered by hand. Calling it again replaces the options.
    """
    global _OVERRIDE
    check_method(method)
    options = _check_patch_options(patch_options)
    homes = _neftune_homes()
    stock = (_OVERRIDE["stock"] if _OVERRIDE is not None
             else tuple(getattr(homes[0], name) for name in _NEFTUNE_NAMES))

    def activate_neftune(model, neftune_noise_alpha, accelerator=None):
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        return NEFTuneHandle(unwrapped, method, neftune_noise_alpha, options)

    def deactivate_neftune(model, hook_handle, accelerator=None):
        if not isinstance(hook_handle, NEFTuneHandle):  # the stock hook's, from before
            return stock[1](model, hook_handle, accelerator)
        hook_handle.remove()

    for home in homes:
        home.activate_neftune, home.deactivate_neftune = activate_neftune, deactivate_neftune
    _OVERRIDE = {"stock": stock, "method": method, "options": options}


def _neftune_homes() -> list:
    import importlib

    import transformers
    try:
        homes = [importlib.import_module(name) for name in _NEFTUNE_HOMES]
    except ImportError as e:
        raise ImportError(f"override_hf_neftune supports transformers' NEFTune functions in "
                          f"{_NEFTUNE_HOMES[0]} (transformers 5); transformers "
                          f"{transformers.__version__}: {e}") from None
    missing = [f"{home.__name__}.{name}" for home in homes for name in _NEFTUNE_NAMES
               if not callable(getattr(home, name, None))]
    if missing:
        raise ImportError(f"override_hf_neftune supports the transformers 5 layout; "
                          f"transformers {transformers.__version__} lacks {missing}")
    return homes


def restore_hf_neftune() -> bool:
    """Put transformers' stock NEFTune functions back under every name; returns False when
    it was not overridden."""
    global _OVERRIDE
    if _OVERRIDE is None:
        return False
    for home in _neftune_homes():
        home.activate_neftune, home.deactivate_neftune = _OVERRIDE["stock"]
    _OVERRIDE = None
    return True
