"""Numbers with their noise, and the verdicts that respect it: the rule that picks a default and
the claim checker both call a difference inside the noise a **tie**.

A cell is a set of measurements of one model configuration, keyed by ``(seed, noise_seed)``: the
training/k-means seed and the eval-noise set. Its number is the mean over all of them, its
uncertainty the standard deviation over them (the spread: training noise and sampling noise
together; stated as such, not as a standard error).

Two cells measured on the same keys are compared **paired**: the differences ``a - b`` key by key
share each key's stage 1 and eval noise, so their spread is the noise of the comparison. A
difference is beyond the noise when its mean lies outside ``t * sd / sqrt(n)`` (Student's t at
95%, two-sided, ``n - 1`` degrees of freedom) **and** outside the instrument's floor (what a
near-lossless model scores against its teacher: smaller differences are not resolvable at all).
With a single shared key only the floor applies, and the verdict says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Key = tuple[int, int]  # (seed, eval-noise seed)


@dataclass(frozen=True)
class Cell:
    values: dict[Key, float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values.values()) / self.n

    @property
    def spread(self) -> float:
        """Sample standard deviation over the keys (0 for one key)."""
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values.values()) / (self.n - 1))

    @property
    def seeds(self) -> list[int]:
        return sorted({s for s, _ in self.values})

    def text(self, digits: int = 2) -> str:
        """``mean ± spread (n)``."""
        return f"{self.mean:.{digits}f} ± {self.spread:.{digits}f} ({self.n})"


def t_quantile(df: int) -> float:
    """Student's t 97.5% quantile with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class Comparison:
    diff: float  # mean of a - b over the shared keys
    noise: float  # the half-width a difference must exceed: max(t * sd / sqrt(n), floor)
    n: int  # shared keys
    verdict: str  # "lower" (a below b beyond the noise), "higher", "tie"

    def text(self, a: str, b: str, digits: int = 2) -> str:
        if self.verdict == "tie":
            return f"{a} vs {b}: tie ({self.diff:+.{digits}f}, noise ±{self.noise:.{digits}f}, {self.n} pairs)"
        word = "below" if self.verdict == "lower" else "above"
        return f"{a} {word} {b} by {abs(self.diff):.{digits}f} (noise ±{self.noise:.{digits}f}, {self.n} pairs)"


def compare(a: Cell, b: Cell, floor: float = 0.0) -> Comparison:
    """Paired comparison of ``a`` and ``b`` over the keys both were measured on."""
    keys = sorted(set(a.values) & set(b.values))
    if not keys:
        raise ValueError("the two cells share no (seed, eval-noise) key: measure them under the same seeds")
    d = [a.values[k] - b.values[k] for k in keys]
    n = len(d)
    mean = sum(d) / n
    half = 0.0
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        half = t_quantile(n - 1) * sd / math.sqrt(n)
    noise = max(half, floor)
    verdict = "tie" if abs(mean) <= noise else ("lower" if mean < 0 else "higher")
    return Comparison(mean, noise, n, verdict)


@dataclass(frozen=True)
class Pick:
    choice: str | None
    best: str | None  # the lowest mean
    tied: tuple[str, ...]  # every candidate tied with the best (the best included)
    why: str


def pick_default(cells: dict[str, Cell], incumbent: str | None = None, floor: float = 0.0,
                 min_seeds: int = 1) -> Pick:
    """The default among ``cells`` (lower is better): the lowest mean, unless other candidates are
    tied with it; then the incumbent stays if it is among them (no change on noise), else the lowest
    mean is taken and the tie is said. Only cells measured on every key any cell has compete."""
    if not cells:
        return Pick(None, None, (), "no candidate was measured")
    keys = set().union(*(c.values.keys() for c in cells.values()))
    full = {r: c for r, c in cells.items() if set(c.values) == keys}
    if not full:
        return Pick(None, None, (), "no candidate was measured on every (seed, eval-noise) key")
    seeds = {s for s, _ in keys}
    if len(seeds) < min_seeds:
        return Pick(None, None, (), f"measured on {len(seeds)} seed(s) of the {min_seeds} the rule needs: no verdict yet")
    best = min(full, key=lambda r: full[r].mean)
    tied = tuple(r for r in sorted(full, key=lambda r: full[r].mean)
                 if r == best or compare(full[r], full[best], floor).verdict == "tie")
    if len(tied) == 1:
        return Pick(best, best, tied, f"{best} is the lowest ({full[best].text()}) beyond the noise of every other")
    if incumbent in tied:
        return Pick(incumbent, best, tied, f"tie between {', '.join(tied)} (lowest mean {best}); the incumbent "
                                           f"{incumbent} stays: the data do not separate them")
    return Pick(best, best, tied, f"tie between {', '.join(tied)}; the lowest mean, {best}, is taken "
                                  f"(the incumbent {incumbent or '-'} is beyond the noise)")
