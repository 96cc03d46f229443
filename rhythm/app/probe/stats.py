"""Paired statistics of ``rhythm probe``, written out (scipy is not a dependency) and exact where it is cheap.

- :func:`sign_test`: two-sided exact binomial test of the signs (ties dropped).
- :func:`wilcoxon_signed_rank`: two-sided; zero differences dropped, tied |d| share their average rank; the
  exact conditional distribution of W+ for n <= ``WILCOXON_EXACT_MAX_N`` (ties included: counted on doubled
  ranks, which are integers), the normal approximation with tie and continuity corrections above.
- :func:`clopper_pearson`: exact binomial confidence interval of a proportion.
- :func:`median_ci`: distribution-free confidence interval of the median from order statistics (the sign
  test inverted).
- :func:`bootstrap_mean_ci`: seeded percentile bootstrap of the mean.
- :func:`spearman`: rank correlation with average ranks for ties.
- :func:`hypergeometric_tail`: exact P(sum of independent hypergeometric counts >= observed), the
  permutation baseline of the coupling lift (anchors placed uniformly at random among the eligible tokens).
- :func:`paired_summary`: all of the above for paired samples (a_i, b_i).

Every p-value is two-sided except the coupling tail (one-sided: more hits than chance).
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

WILCOXON_EXACT_MAX_N = 50
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def _binomial_half_cdf(k: int, n: int) -> Fraction:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly."""
    return Fraction(sum(math.comb(n, i) for i in range(0, k + 1)), 2 ** n)


def sign_test(n_less: int, n_greater: int) -> float:
    """Two-sided exact sign test: p = min(1, 2 P(X <= min(n_less, n_greater))), X ~ Bin(n_less + n_greater, 1/2).
    1.0 when there is no untied pair."""
    n = n_less + n_greater
    if n == 0:
        return 1.0
    return float(min(Fraction(1), 2 * _binomial_half_cdf(min(n_less, n_greater), n)))


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks of ``values``; tied values get the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j + 2) / 2          # mean of ranks i+1 .. j+1
        i = j + 1
    return ranks


def wilcoxon_signed_rank(diffs: list[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of the differences ``diffs`` (zeros dropped).

    Returns {"n": nonzero count, "w_plus": sum of the ranks of the positive differences, "p": p-value,
    "method": "exact" | "normal" | "none" (no nonzero difference: p = 1)}.
    """
    d = [x for x in diffs if x != 0]
    n = len(d)
    if n == 0:
        return {"n": 0, "w_plus": 0.0, "p": 1.0, "method": "none"}
    ranks = average_ranks([abs(x) for x in d])
    w_plus = sum(r for r, x in zip(ranks, d) if x > 0)
    if n <= WILCOXON_EXACT_MAX_N:
        # Under H0 each rank carries + or - with probability 1/2, independently. Doubled ranks are integers,
        # so count[s] = number of the 2^n sign patterns whose doubled W+ is s.
        doubled = [round(2 * r) for r in ranks]
        count = [0] * (sum(doubled) + 1)
        count[0] = 1
        top = 0
        for r in doubled:
            for s in range(top, -1, -1):
                if count[s]:
                    count[s + r] += count[s]
            top += r
        w = round(2 * w_plus)
        low = sum(count[: w + 1])
        high = sum(count[w:])
        p = min(Fraction(1), Fraction(2 * min(low, high), 2 ** n))
        return {"n": n, "w_plus": w_plus, "p": float(p), "method": "exact"}
    # Normal approximation: E[W+] = n(n+1)/4, Var = n(n+1)(2n+1)/24 - sum over tie groups (t^3 - t)/48.
    mean = n * (n + 1) / 4
    ties: dict[float, int] = {}
    for r in ranks:
        ties[r] = ties.get(r, 0) + 1
    var = n * (n + 1) * (2 * n + 1) / 24 - sum(t ** 3 - t for t in ties.values()) / 48
    if var <= 0:
        return {"n": n, "w_plus": w_plus, "p": 1.0, "method": "normal"}
    gap = abs(w_plus - mean)
    z = max(0.0, gap - 0.5) / math.sqrt(var)        # continuity correction
    return {"n": n, "w_plus": w_plus, "p": min(1.0, math.erfc(z / math.sqrt(2))), "method": "normal"}


def _log_binomial_pmf(i: int, n: int, p: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p))


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k), X ~ Bin(n, p), 0 < p < 1 (summed in log space: no overflow for large n)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [_log_binomial_pmf(i, n, p) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def _bisect(f, target: float) -> float:
    """The p in (0, 1) with f(p) = target for f decreasing in p (60 halvings: below 1e-15)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(x: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Exact (Clopper-Pearson) interval of a binomial proportion x / n; None when n = 0.

    lower: P(X >= x | p) = alpha / 2 (0 when x = 0); upper: P(X <= x | p) = alpha / 2 (1 when x = n)."""
    if n == 0:
        return None
    if not 0 <= x <= n:
        raise ValueError(f"x must be in [0, n = {n}], got {x}")
    alpha = 1 - confidence
    lower = 0.0 if x == 0 else 1 - _bisect(lambda p: 1 - _binomial_cdf(x - 1, n, 1 - p), alpha / 2)
    upper = 1.0 if x == n else _bisect(lambda p: _binomial_cdf(x, n, p), alpha / 2)
    return lower, upper


def median_ci(values: list[float], confidence: float = CONFIDENCE) -> dict | None:
    """Distribution-free interval of the median: [v_(j), v_(n+1-j)] (1-based order statistics) with the
    largest j such that P(B <= j - 1) <= alpha / 2, B ~ Bin(n, 1/2); its exact coverage is
    1 - 2 P(B <= j - 1) >= confidence. None when n is too small for any such j (n < 6 at 95%)."""
    n = len(values)
    alpha = Fraction(1 - confidence).limit_denominator(10 ** 9)
    j = 0
    while j + 1 <= n // 2 and _binomial_half_cdf(j, n) <= alpha / 2:   # P(B <= (j + 1) - 1)
        j += 1
    if j == 0:
        return None
    ordered = sorted(values)
    return {"low": ordered[j - 1], "high": ordered[n - j],
            "coverage": float(1 - 2 * _binomial_half_cdf(j - 1, n))}


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, "linear")."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bootstrap_mean_ci(values: list[float], *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                      confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (``resamples`` draws with replacement from a
    ``random.Random(seed)``); None for an empty sample."""
    n = len(values)
    if n == 0:
        return None
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    alpha = 1 - confidence
    return _quantile(means, alpha / 2), _quantile(means, 1 - alpha / 2)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho (Pearson correlation of the average ranks); None when n < 3 or a side is constant."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def hypergeometric_pmf(population: int, marked: int, drawn: int) -> list[float]:
    """P(X = x) for x = 0..drawn: ``drawn`` items taken without replacement from ``population`` items of which
    ``marked`` are marked, X = marked items taken."""
    if not 0 <= marked <= population or not 0 <= drawn <= population:
        raise ValueError(f"need 0 <= marked, drawn <= population; got {marked}, {drawn}, {population}")
    total = math.comb(population, drawn)
    return [math.comb(marked, x) * math.comb(population - marked, drawn - x) / total for x in range(drawn + 1)]


def hypergeometric_tail(groups: list[tuple[int, int, int]], observed: int) -> float:
    """P(X_1 + ... + X_m >= observed) for independent X_i ~ Hypergeometric(population, marked, drawn) given as
    ``groups`` of (population, marked, drawn)."""
    dist = [1.0]
    for population, marked, drawn in groups:
        pmf = hypergeometric_pmf(population, marked, drawn)
        out = [0.0] * (len(dist) + len(pmf) - 1)
        for i, a in enumerate(dist):
            if a:
                for j, b in enumerate(pmf):
                    out[i + j] += a * b
        dist = out
    return min(1.0, max(0.0, sum(dist[observed:]))) if observed > 0 else 1.0


def paired_summary(a: list[float], b: list[float], *, seed: int = 0) -> dict:
    """Paired comparison of samples a and b (d_i = a_i - b_i): means, mean difference with its bootstrap
    interval, median difference with its order-statistic interval, how often a < b (with the exact interval
    of that share over all pairs), and the sign and Wilcoxon tests."""
    if len(a) != len(b):
        raise ValueError(f"a and b must be paired (same length), got {len(a)} and {len(b)}")
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    less = sum(1 for x in d if x < 0)
    greater = sum(1 for x in d if x > 0)
    wil = wilcoxon_signed_rank(d)
    mean = (lambda v: sum(v) / len(v) if v else None)
    return {
        "n": n, "mean_a": mean(a), "mean_b": mean(b), "mean_diff": mean(d),
        "mean_diff_ci": bootstrap_mean_ci(d, seed=seed), "median_diff": median(d), "median_diff_ci": median_ci(d),
        "n_less": less, "n_greater": greater, "n_ties": n - less - greater,
        "share_less": less / n if n else None, "share_less_ci": clopper_pearson(less, n),
        "sign_p": sign_test(less, greater), "wilcoxon_p": wil["p"], "wilcoxon_method": wil["method"],
        "wilcoxon_n": wil["n"], "w_plus": wil["w_plus"],
    }
