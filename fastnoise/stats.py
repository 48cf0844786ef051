"""Statistical checks of the noise distributions (used by ``fastnoise check`` and the tests).

No SciPy needed: the Kolmogorov-Smirnov statistic is computed directly from sorted samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: KS critical value coefficient at significance 0.001 (c(alpha) = sqrt(-ln(alpha / 2) / 2))
KS_C_001 = math.sqrt(-math.log(0.001 / 2) / 2)

#: theoretical mean, variance and CDF of xi for each noise kind
_MOMENTS = {"uniform": (0.0, 1.0 / 3.0), "gaussian": (0.0, 1.0), "bernoulli": (0.0, 1.0)}


def _cdf(noise: str, x: torch.Tensor) -> torch.Tensor:
    if noise == "uniform":
        return ((x + 1) / 2).clamp(0, 1)
    if noise == "gaussian":
        return 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    raise ValueError(f"no continuous CDF for {noise!r}")


def ks_statistic(noise: str, xi: torch.Tensor) -> float:
    """sup |F_n(x) - F(x)| of the samples against the noise kind's distribution."""
    x, _ = torch.sort(xi.reshape(-1).double())
    n = x.numel()
    cdf = _cdf(noise, x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


@dataclass
class NoiseStats:
    noise: str
    n: int
    mean: float
    var: float
    min: float
    max: float
    ks: float  # KS statistic (0 for bernoulli)
    problems: list

    @property
    def ok(self) -> bool:
        return not self.problems


def check_noise_samples(noise: str, xi: torch.Tensor) -> NoiseStats:
    """Moments, bounds and KS of unscaled noise samples; ``problems`` lists what failed."""
    x = xi.reshape(-1).double().cpu()
    n = x.numel()
    mean, var = float(x.mean()), float(x.var())
    lo, hi = float(x.min()), float(x.max())
    mu, sigma2 = _MOMENTS[noise]
    problems = []
    if not math.isfinite(mean) or abs(mean - mu) > 6 * math.sqrt(sigma2 / n):
        problems.append(f"mean {mean:.5f} is not {mu}")
    # the variance of the sample variance is (mu4 - sigma^4) / n, at most 2 sigma^4 / n here
    if not math.isfinite(var) or abs(var - sigma2) > 6 * sigma2 * math.sqrt(2.0 / n):
        problems.append(f"variance {var:.5f} is not {sigma2:.5f}")
    ks = 0.0
    if noise == "uniform":
        if lo < -1 or hi >= 1:
            problems.append(f"values outside [-1, 1): [{lo}, {hi}]")
        ks = ks_statistic(noise, x)
    elif noise == "gaussian":
        ks = ks_statistic(noise, x)
    else:
        if not bool(((x == 1) | (x == -1)).all()):
            problems.append("values other than +1 / -1")
    if ks > KS_C_001 / math.sqrt(n):
        problems.append(f"KS statistic {ks:.5f} > {KS_C_001 / math.sqrt(n):.5f} (p < 0.001)")
    return NoiseStats(noise, n, mean, var, lo, hi, ks, problems)
