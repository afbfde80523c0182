"""Statistics of the reports: pure functions of plain numbers (no MLflow, no I/O).

Seeds are the unit of replication: a row's spread is the sample standard deviation over seeds, and a
row is compared with the baseline by the per-seed differences (same seed, same data order and init
stream), which removes the seed-to-seed variation both rows share.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

__all__ = ["NO_RUNS", "fmt_summary", "Summary", "PairedCI", "Ordering", "summarize", "paired_differences", "paired_ci",
           "kendall_ordering", "agreement_words", "ordering_verdict"]

NO_RUNS = "no runs"


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation over ``n`` seeds (``std`` is NaN below two seeds)."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class PairedCI:
    """Mean of the per-seed differences and its t-interval (NaN bounds below two pairs)."""

    mean: float
    low: float
    high: float
    n_pairs: int
    confidence: float

    @property
    def has_interval(self) -> bool:
        return self.n_pairs >= 2 and math.isfinite(self.low) and math.isfinite(self.high)


@dataclass(frozen=True)
class Ordering:
    """Kendall's tau-b between our row means and the paper's, over the rows both have."""

    tau: float
    p_value: float
    n: int


def summarize(values: Sequence[float]) -> Optional[Summary]:
    """Mean ± sample std (ddof = 1) of ``values``; None when there are none."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    mean = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return Summary(mean, float("nan"), 1)
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return Summary(mean, math.sqrt(var), len(vals))


def fmt_summary(summary: Optional[Summary]) -> str:
    """``46.10 ± 0.32 (n=3)``, ``46.10 (n=1)`` or ``no runs``."""
    if summary is None:
        return NO_RUNS
    if summary.n < 2:
        return f"{summary.mean:.2f} (n=1)"
    return f"{summary.mean:.2f} ± {summary.std:.2f} (n={summary.n})"


def paired_differences(row: Mapping[int, float], baseline: Mapping[int, float]) -> list[float]:
    """``row[s] - baseline[s]`` for every seed ``s`` both have, in seed order."""
    return [float(row[s]) - float(baseline[s]) for s in sorted(set(row) & set(baseline))]


def paired_ci(diffs: Sequence[float], confidence: float = 0.95) -> Optional[PairedCI]:
    """Mean difference with a two-sided Student-t interval on ``n - 1`` degrees of freedom.

    None without any pair; with one pair the mean is the single difference and the bounds are NaN,
    since one difference says nothing about its own spread.
    """
    from scipy.stats import t

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    summary = summarize(diffs)
    if summary is None:
        return None
    if summary.n < 2:
        return PairedCI(summary.mean, float("nan"), float("nan"), 1, confidence)
    half = float(t.ppf(0.5 + confidence / 2.0, summary.n - 1)) * summary.std / math.sqrt(summary.n)
    return PairedCI(summary.mean, summary.mean - half, summary.mean + half, summary.n, confidence)


def kendall_ordering(ours: Mapping[str, float], paper: Mapping[str, float]) -> Optional[Ordering]:
    """Kendall's tau-b (scipy) over the labels present in both with finite values; None below 2."""
    from scipy.stats import kendalltau

    labels = [k for k in ours if k in paper and _finite(ours[k]) and _finite(paper[k])]
    if len(labels) < 2:
        return None
    with warnings.catch_warnings():  # constant input gives NaN, which agreement_words reports itself
        warnings.simplefilter("ignore")
        res = kendalltau([ours[k] for k in labels], [paper[k] for k in labels])
    return Ordering(float(res.statistic), float(res.pvalue), len(labels))


def agreement_words(tau: float) -> str:
    """Plain words for |tau|, with fixed cut points (0.2, 0.5, 0.8) chosen before any result."""
    if not math.isfinite(tau):
        return "undefined (all values tied)"
    size = abs(tau)
    if size < 0.2:
        return "no clear agreement"
    strength = "weak" if size < 0.5 else "moderate" if size < 0.8 else "strong"
    return f"{strength} {'agreement' if tau > 0 else 'disagreement (reversed order)'}"


def ordering_verdict(ordering: Optional[Ordering], what: str = "ordering vs paper") -> str:
    """One line, e.g. ``ordering vs paper: Kendall τ = 0.43 over 7 rows (p = 0.24): weak agreement``."""
    if ordering is None:
        return f"{what}: not computable (fewer than 2 rows have both our result and the paper's)"
    line = f"{what}: Kendall τ = {ordering.tau:.2f} over {ordering.n} rows (p = {ordering.p_value:.2f})"
    line += f": {agreement_words(ordering.tau)}"
    if ordering.n < 5:
        # With n <= 4 rows even a perfect ordering has p > 0.05: say so instead of implying evidence.
        line += f"; {ordering.n} rows are too few to be conclusive"
    elif math.isfinite(ordering.p_value) and ordering.p_value >= 0.05:
        line += "; not significant at the 5% level"
    return line


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(float(value))
