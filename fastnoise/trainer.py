"""Hugging Face ``Trainer`` (and TRL ``SFTTrainer``) integration: one callback.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[FastNoiseCallback("neftune", alpha=5.0, noisytune_lam=0.15)])

Do not also set ``TrainingArguments(neftune_noise_alpha=...)``: that adds the Hugging Face
hook's noise on top.
"""

from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback

from .functional import check_method, check_nonnegative
from .noisytune import check_patterns, noisytune_
from .integrations import patch, unpatch

__all__ = ["FastNoiseCallback"]


class FastNoiseCallback(TrainerCallback):
    """Patches the model's input embedding at train begin and restores it at train end;
    with ``noisytune_lam`` set, applies NoisyTune once, before the first step, to the
    parameters ``noisytune_include`` / ``noisytune_exclude`` / ``noisytune_trainable_only``
    select (``fastnoise.noisytune_``'s ``include`` / ``exclude`` / ``trainable_only``)."""

    def __init__(self, method: Optional[str] = "neftune", alpha: float = 5.0, *,
                 noisytune_lam: Optional[float] = None, seed: Optional[int] = None,
                 noisytune_include=None, noisytune_exclude=None,
                 noisytune_trainable_only: bool = False, **patch_kwargs):
        if method is not None:
            check_method(method)
        self.method, self.alpha = method, check_nonnegative("alpha", alpha)
        self.noisytune_lam = (None if noisytune_lam is None
                              else check_nonnegative("noisytune_lam", noisytune_lam))
        self.seed, self.patch_kwargs = seed, patch_kwargs
        # NoisyTune's parameter selection, passed through (see fastnoise.noisytune_)
        check_patterns("noisytune_include", noisytune_include)
        check_patterns("noisytune_exclude", noisytune_exclude)
        self.noisytune_selection = {"include": noisytune_include, "exclude": noisytune_exclude,
                                    "trainable_only": bool(noisytune_trainable_only)}
        self._tuned = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FastNoiseCallback needs the Trainer to pass the model")
        if getattr(args, "neftune_noise_alpha", None):  # checked before NoisyTune changes anything
            raise ValueError("TrainingArguments.neftune_noise_alpha is set: the Hugging Face "
                             "hook would add its noise on top of fastnoise's; unset it")
        if self.noisytune_lam and not self._tuned and state.global_step == 0:
            noisytune_(model, self.noisytune_lam, seed=self.seed, **self.noisytune_selection)
        self._tuned = True  # never again, also not when training resumes
        if self.method is not None:
            patch(model, self.method, self.alpha, **self.patch_kwargs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.method is not None:
            unpatch(model)
