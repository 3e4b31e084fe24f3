"""How sure a number is: a Wilson 95% interval for an accuracy (k of n prompts), a bootstrap 95% interval over
documents for a mean NLL (hence perplexity), lm-eval's own standard error. Each rides on its number as an
`Estimate`, a float that also carries its interval, so tables and sums treat it as the number it is and the
results writer (`schema.Table`) finds the interval beside it."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_DRAWS = 1000


class Estimate(float):
    """A number with a 95% interval [lo, hi] or a standard error (lm-eval's); arithmetic gives plain floats."""

    lo: float | None
    hi: float | None
    stderr: float | None

    def __new__(cls, value: float, lo: float | None = None, hi: float | None = None, stderr: float | None = None):
        self = super().__new__(cls, value)
        self.lo, self.hi, self.stderr = lo, hi, stderr
        return self

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units (a share as a percentage)."""
        lo, hi, stderr = (None if v is None else v * factor for v in (self.lo, self.hi, self.stderr))
        return Estimate(float(self) * factor, lo, hi, stderr)


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: stays inside [0, 1] and is not empty at 0 or n successes
    (2 of 2: [0.342, 1]; 0 of 10: [0, 0.278]), where the normal approximation gives [1, 1] and [0, 0]."""
    if trials <= 0:
        raise ValueError("a proportion needs at least one trial")
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(successes: int, trials: int) -> Estimate:
    """An accuracy in percent with its Wilson 95% interval."""
    lo, hi = wilson(successes, trials)
    return Estimate(100.0 * successes / trials, 100.0 * lo, 100.0 * hi)


def bootstrap_mean(sums, counts, seed: int = 0, draws: int = BOOTSTRAP_DRAWS) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of sum(sums)/sum(counts) with documents (one sum and count each)
    resampled with replacement; None for fewer than 2 documents. Seeded: the same inputs give the same interval."""
    import numpy as np

    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    if len(sums) < 2:
        return None
    pick = np.random.default_rng(seed).integers(0, len(sums), size=(draws, len(sums)))
    means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)
