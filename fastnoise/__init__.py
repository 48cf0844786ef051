"""fastnoise: fused kernels for noise-regularized fine-tuning (NEFTune, SymNoise, NoisyTune).

The pure-PyTorch reference (:mod:`fastnoise.reference`) defines every noise and every random
draw; the Triton, CUDA and C++ CPU backends reproduce it in single fused kernels.
"""

import warnings

from . import reference
from .build import ExtensionMismatchWarning, build_info, torch_mismatch as _torch_mismatch
from .backends import BackendUnavailableError, available_backends
from .errors import BadPackingError, BadTokenIdError, DeviceError, check_errors
from .functional import METHODS, NOISE_KINDS, noisy_embedding
from .noisytune import noisytune_
from .seeds import set_rank_distinct_noise
from .integrations import is_patched, patch, unpatch
from .modules import NoisyEmbedding

# another torch than the extension's: say so once, at import (the backends say it too)
_MISMATCH = _torch_mismatch()
if _MISMATCH is not None:
    warnings.warn(_MISMATCH, ExtensionMismatchWarning, stacklevel=2)

_TRAINER_NAMES = ("FastNoiseCallback", "override_hf_neftune", "restore_hf_neftune")


def __getattr__(name):
    # the Trainer integration imports transformers: only when asked for (so not in __all__)
    if name in _TRAINER_NAMES:
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'fastnoise' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "noisy_embedding", "noisytune_", "NoisyEmbedding", "patch", "unpatch", "is_patched",
    "available_backends", "set_rank_distinct_noise", "BackendUnavailableError", "METHODS",
    "NOISE_KINDS", "reference", "check_errors", "DeviceError", "BadTokenIdError",
    "BadPackingError", "build_info", "ExtensionMismatchWarning",
]
