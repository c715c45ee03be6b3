"""Uncertainty for experiment results: which differences between variants can be trusted.

    mean_ci(values)                    mean and Student-t 95 % interval across seeds
    bootstrap_ci(per_example)          a single run's metric with a percentile bootstrap over test examples
    welch_diff_ci(a, b)                difference of two variants' means across seeds (Welch's t interval)
    paired_bootstrap_diff(a, b)        difference of two single runs on the same test examples (paired)
    paired_proportion_diff(a, b)       difference of two accuracies on the same items (0/1 each), analytic (Wald)
    paired_proportion_ratio(a, b)      ratio of two accuracies on the same items (delta method on the log ratio)
    binomial_se(p, n)                  the standard error of an accuracy p on n examples

An interval that excludes 0 marks a difference as *resolved*. No dependency beyond the standard library
and torch: the t quantile comes from the regularised incomplete beta function (continued fraction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided confidence interval [low, high]."""

    estimate: float
    low: float
    high: float
    n: int
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def resolved(self) -> bool:
        """For a difference: the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        return f"{self.estimate * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


# ---------------------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes' betacf, Lentz's method)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on the CDF, to 1e-12)."""
    if not 0 < p < 1:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------- intervals
def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of independent runs (e.g. seeds) with a Student-t interval; one run has no interval (inf)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, "t (one run: no interval)")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    h = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - h, mean + h, n, f"t, {n} runs")


def welch_diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """mean(a) - mean(b) with Welch's t interval (unequal variances; Welch-Satterthwaite df)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError("welch_diff_ci needs at least two runs per variant")
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    if se2 == 0:
        return Interval(ma - mb, ma - mb, ma - mb, na + nb, "welch (no variance)")
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    h = t_quantile(0.5 + confidence / 2, df) * math.sqrt(se2)
    return Interval(ma - mb, ma - mb - h, ma - mb + h, na + nb, f"welch t, df {df:.1f}")


def paired_t_diff(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """mean(a - b) over pairs (a[i], b[i]) -- e.g. two variants trained with the same seeds, whose per-seed
    differences share the seed's data order and initialisation -- with a Student-t interval on the differences
    (n - 1 df). Tighter than Welch's interval where the seed moves both variants alike."""
    if len(a) != len(b):
        raise ValueError(f"paired_t_diff needs pairs: {len(a)} values against {len(b)}")
    if len(a) < 2:
        raise ValueError("paired_t_diff needs at least two pairs")
    d = mean_ci([x - y for x, y in zip(a, b)], confidence)
    return Interval(d.estimate, d.low, d.high, d.n, f"paired t, {d.n} pairs")


# Resampled indices are drawn this many at a time, into buffers allocated once (int64 indices and one gathered
# float64 row block: 16 bytes each, ~64 MB). Drawing all n_boot × n at once needs 10,000 × 25,000 (IMDb's test set)
# ≈ 4 GB and runs a 200,000-example task out of memory; fresh 32 MB blocks per chunk are no cure either, because
# glibc's growing mmap threshold puts them on a heap that fragments (1.2 GB for 200,000 × 1,000). `random_` on the
# buffer is what `torch.randint` does, so the chunks continue one generator stream in order: the means, and every
# interval, are those of the one-shot draw.
RESAMPLE_CHUNK_ELEMENTS = 4_000_000


def _resampled_means(series: tuple[torch.Tensor, ...], n_boot: int, seed: int) -> list[torch.Tensor]:
    """Means of each series (1-D, same length n) over n_boot bootstrap resamples of the examples, drawn jointly
    (one index set per resample for all series: paired), at most RESAMPLE_CHUNK_ELEMENTS indices at a time."""
    n = series[0].numel()
    if n == 0:
        raise ValueError("a bootstrap needs at least one example")
    rows = max(1, min(n_boot, RESAMPLE_CHUNK_ELEMENTS // n))
    g = torch.Generator().manual_seed(seed)
    idx = torch.empty(rows * n, dtype=torch.int64)
    picked = torch.empty(rows * n, dtype=torch.float64)
    out = [torch.empty(n_boot, dtype=torch.float64) for _ in series]
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        block = idx[: k * n].random_(0, n, generator=g)
        for mean, x in zip(out, series):
            torch.index_select(x, 0, block, out=picked[: k * n])
            mean[start:start + k] = picked[: k * n].view(k, n).mean(1)
    return out


def bootstrap_ci(per_example: Sequence[float], confidence: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> Interval:
    """The mean of per-example scores (1/0 correctness: accuracy) with a percentile bootstrap interval."""
    x = torch.as_tensor(per_example, dtype=torch.float64)
    n = x.numel()
    (means,) = _resampled_means((x,), n_boot, seed)
    lo, hi = torch.quantile(means, torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64))
    return Interval(x.mean().item(), lo.item(), hi.item(), n, f"bootstrap, {n} examples")


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, n_boot: int = 10_000,
                          seed: int = 0) -> Interval:
    """mean(a) - mean(b) for two runs scored on the same examples, resampling examples jointly (paired)."""
    if len(a) != len(b):
        raise ValueError(f"paired runs need the same examples ({len(a)} vs {len(b)})")
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    out = bootstrap_ci(d.tolist(), confidence, n_boot, seed)
    return Interval(out.estimate, out.low, out.high, out.n, f"paired bootstrap, {out.n} examples")


def paired_bootstrap_ratio(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, n_boot: int = 10_000,
                           seed: int = 0) -> Interval:
    """mean(a) / mean(b) for two models scored on the same examples (e.g. student and teacher accuracy),
    with a percentile interval from resampling the examples jointly."""
    if len(a) != len(b):
        raise ValueError(f"paired runs need the same examples ({len(a)} vs {len(b)})")
    x, y = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    n = x.numel()
    mean_x, mean_y = _resampled_means((x, y), n_boot, seed)
    ratios = mean_x / mean_y.clamp(min=1e-12)
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(ratios, q)
    return Interval((x.mean() / y.mean()).item(), lo.item(), hi.item(), n, f"paired bootstrap ratio, {n} examples")


def binomial_ratio_ci(pa: float, na: int, pb: float, nb: int, confidence: float = 0.95) -> Interval:
    """pa / pb for two accuracies on na and nb independent examples, with a delta-method interval on the log
    ratio (for accuracies of two models on the same examples it is conservative: their errors correlate)."""
    if min(pa, pb) <= 0:
        raise ValueError("binomial_ratio_ci needs accuracies > 0")
    se = math.sqrt((1 - pa) / (pa * na) + (1 - pb) / (pb * nb))
    z = -_normal_quantile((1 - confidence) / 2)
    r = pa / pb
    return Interval(r, r * math.exp(-z * se), r * math.exp(z * se), min(na, nb), "binomial, log-ratio delta method")


def _paired_counts(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    x, y = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if x.numel() != y.numel() or x.numel() == 0:
        raise ValueError(f"paired accuracies need the same, non-empty items ({x.numel()} vs {y.numel()})")
    if not bool(((x == 0) | (x == 1)).all() and ((y == 0) | (y == 1)).all()):
        raise ValueError("paired accuracies need 0/1 correctness per item")
    n = x.numel()
    return x.mean().item(), y.mean().item(), (x * y).mean().item(), n


def paired_proportion_diff(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor,
                           confidence: float = 0.95) -> Interval:
    """mean(a) - mean(b) for two 0/1 correctness vectors on the same items (two models on the same masked
    tokens), with the Wald interval for dependent proportions (McNemar's setting): Var = ((p10 + p01) -
    (p10 - p01)^2) / n, p10 / p01 the shares of items only a / only b got right. Pairing removes the
    item-difficulty variance the two share, so it resolves far smaller differences than two binomials."""
    pa, pb, p11, n = _paired_counts(a, b)
    p10, p01 = pa - p11, pb - p11
    d = pa - pb
    se = math.sqrt(max((p10 + p01) - d * d, 0.0) / n)
    z = -_normal_quantile((1 - confidence) / 2)
    return Interval(d, d - z * se, d + z * se, n, f"paired (McNemar-Wald), {n} items")


def paired_proportion_ratio(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor,
                            confidence: float = 0.95) -> Interval:
    """mean(a) / mean(b) for two 0/1 correctness vectors on the same items, with a delta-method interval on
    the log ratio that includes their covariance: Var(log r) = (Var a / pa^2 + Var b / pb^2 - 2 Cov / (pa pb))
    / n, Cov = p11 - pa pb."""
    pa, pb, p11, n = _paired_counts(a, b)
    if min(pa, pb) <= 0:
        raise ValueError("paired_proportion_ratio needs accuracies > 0")
    var = (pa * (1 - pa) / pa**2 + pb * (1 - pb) / pb**2 - 2 * (p11 - pa * pb) / (pa * pb)) / n
    se = math.sqrt(max(var, 0.0))
    z = -_normal_quantile((1 - confidence) / 2)
    r = pa / pb
    return Interval(r, r * math.exp(-z * se), r * math.exp(z * se), n, f"paired, log-ratio delta method, {n} items")


def _normal_quantile(p: float) -> float:
    """The standard normal quantile (inverse CDF) by bisection on erf."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n)
