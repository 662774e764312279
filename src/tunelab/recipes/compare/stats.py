"""What a compare may claim from a few seeds: a mean with its 95 % confidence interval (Student t),
and paired t-tests over seeds against the base and against the best variant of the task.

A difference whose paired test gives p >= 0.05 is reported as within noise. With 3 seeds only
large or very consistent differences clear that bar, which is the point: a table of means alone
would rank noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as st

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    half_width: float  # of the 95 % CI; nan with one seed

    def text(self, digits: int = 3) -> str:
        if self.n < 2 or math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Summary(n, mean, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Summary(n, mean, float(st.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Test:
    diff: float  # mean of a - b
    p: float  # two-sided; nan where untestable (fewer than 2 pairs)

    @property
    def separates(self) -> bool:
        return not math.isnan(self.p) and self.p < ALPHA

    def text(self, scale: float = 1.0, unit: str = "") -> str:
        d = f"{self.diff * scale:+.1f}{unit}"
        if math.isnan(self.p):
            return f"{d} (untested)"
        return f"{d} (p={self.p:.3f})" if self.separates else f"{d} (p={self.p:.2f}, within noise)"


def paired(a: dict[int, float], b: dict[int, float]) -> Test:
    """Paired t-test of a - b over the seeds both have; a `b` of one value (a deterministic
    zero-shot base is one cell) is compared as a constant (one-sample test)."""
    if len(a) == 1 and len(b) > 1:  # the one-cell side first: the same test, the sign turned
        flipped = paired(b, a)
        return Test(-flipped.diff, flipped.p)
    if len(b) == 1 and len(a) > 1:
        const = next(iter(b.values()))
        b = {k: const for k in a}
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return Test(math.nan, math.nan)
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return Test(mean, math.nan)
    if max(diffs) - min(diffs) <= 1e-12 * max(1.0, abs(mean)):  # no spread (up to rounding): the same every seed
        return Test(mean, 1.0 if abs(mean) <= 1e-12 else 0.0)
    return Test(mean, float(st.ttest_1samp(diffs, 0.0).pvalue))


def sign_test(k: int, n: int) -> float:
    """Two-sided exact binomial (sign) test of k successes in n at p = 1/2: e.g. questions one model gets
    right and another wrong (k) among the questions where they differ (n). 1.0 when n is 0."""
    return float(st.binomtest(k, n, 0.5).pvalue) if n else 1.0


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both: lower cost (x) and higher score (y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front
