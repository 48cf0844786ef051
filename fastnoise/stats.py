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


# --------------------------------------------------------------------------------------
# Paired t-tests over seeds (the convergence tests and ``bench --convergence``): Student's t
# from the regularized incomplete beta function, so no SciPy is needed
# --------------------------------------------------------------------------------------
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; Numerical Recipes' betacf)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_sf`, to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_sf(mid, df) > 1.0 - p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass
class PairedTest:
    """A paired comparison over n seeds: differences a_k - b_k."""
    n: int
    mean: float
    sd: float            # sample standard deviation of the differences
    se: float            # sd / sqrt(n)
    p_differ: float      # two-sided p of "the mean difference is 0" (paired t-test)
    margin: float        # equivalence margin (TOST: |true mean difference| < margin); nan if none
    p_equivalent: float  # TOST p: the larger of the two one-sided p values; nan if no margin
    ci90: tuple          # the 90% confidence interval of the mean difference (TOST at 5%)

    def equivalent(self, level: float = 0.05) -> bool:
        return self.p_equivalent < level

    def differ(self, level: float = 0.05) -> bool:
        return self.p_differ < level


def paired_test(a, b, margin: float = float("nan")) -> PairedTest:
    """Paired t-test and, with ``margin``, the two one-sided tests (TOST, Schuirmann 1987) of
    ``mean(a - b)``: equivalent at level 5% when the 90% interval lies inside (-margin, margin)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 pairs, got {n}")
    mean = sum(diffs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
    se, df = sd / math.sqrt(n), n - 1
    if se == 0.0:  # identical differences: the sign of the mean decides
        p_differ = 1.0 if mean == 0.0 else 0.0
        p_lower = 0.0 if mean > -margin else 1.0
        p_upper = 0.0 if mean < margin else 1.0
    else:
        p_differ = 2.0 * t_sf(abs(mean) / se, df)
        p_lower = t_sf((mean + margin) / se, df)   # H0: mean <= -margin
        p_upper = t_sf((margin - mean) / se, df)   # H0: mean >= +margin
    half = t_quantile(0.95, df) * se
    p_equivalent = max(p_lower, p_upper) if math.isfinite(margin) else float("nan")
    return PairedTest(n, mean, sd, se, min(1.0, p_differ), margin, p_equivalent,
                      (mean - half, mean + half))
