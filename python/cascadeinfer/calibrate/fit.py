"""Fits the cost model's six timing terms to measured steps, and reports the fit error.

The model (cost.rs) is linear in its terms once heterogeneity is split off:

    step = t0 + s*n + c*(S + h*(n*Lmax - S)) + q*P + r*Q
         = t0 + s*n + a*S + b*(n*Lmax - S) + q*P + r*Q,     a = c, b = c*h

so (t0, s, a, b, q, r) come from one linear least-squares problem with every term >= 0 and
b <= a (h in [0, 1]). Residuals are relative (each row divided by its measured time), so a 5 ms
step counts as much as a 500 ms one. Non-negative least squares by enumeration: the optimum is
the unconstrained least-squares solution on its own support, so of the 2^5 supports (the
overhead is always in) the best one whose solution is non-negative is the answer. If that
solution has b > a, the optimum lies on h = 1, and the fit is repeated with S and the padding
as one column (n*Lmax). Pure Python: six columns and a few dozen rows need no numpy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from cascadeinfer.calibrate.measure import Measurement, Shape

RANK_TOLERANCE = 1e-10
SIGNIFICANT_DIGITS = 6


@dataclass(frozen=True)
class Coefficients:
    step_overhead_s: float
    per_sequence_s: float
    per_context_token_s: float
    heterogeneity: float
    per_prefill_token_s: float
    prefill_attention_s: float

    def predict(self, shape: Shape) -> float:
        """The step time cost.rs `step_time` gives for this batch."""
        return (
            self.step_overhead_s
            + self.per_sequence_s * shape.num_decode
            + self.per_context_token_s
            * (shape.sum_context + self.heterogeneity * max(shape.padding, 0))
            + self.per_prefill_token_s * shape.prefill_tokens
            + self.prefill_attention_s * shape.prefill_pairs
        )


@dataclass(frozen=True)
class PointFit:
    label: str
    kind: str
    shape: Shape
    measured_s: float
    predicted_s: float

    @property
    def rel_error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


@dataclass(frozen=True)
class FitResult:
    coefficients: Coefficients
    points: tuple[PointFit, ...]
    notes: tuple[str, ...]
    """Terms fitted to 0 or clamped, terms the grid did not measure."""

    @property
    def mean_abs_rel_error(self) -> float:
        return sum(abs(p.rel_error) for p in self.points) / len(self.points)

    @property
    def max_abs_rel_error(self) -> float:
        return max(abs(p.rel_error) for p in self.points)


def _lstsq(columns: Sequence[Sequence[float]], y: Sequence[float]) -> list[float] | None:
    """argmin |A x - y| by Householder QR (A given by columns); None when A is rank-deficient."""
    m, k = len(y), len(columns)
    if m < k:
        return None
    # Unit columns: the terms differ by orders of magnitude (1 vs tokens vs token pairs).
    norms = [math.sqrt(sum(v * v for v in col)) for col in columns]
    if min(norms) == 0.0:
        return None
    a = [[columns[j][i] / norms[j] for j in range(k)] for i in range(m)]
    b = list(y)
    for j in range(k):
        norm = math.sqrt(sum(a[i][j] ** 2 for i in range(j, m)))
        if norm <= RANK_TOLERANCE:
            return None
        alpha = -norm if a[j][j] >= 0 else norm
        v = [0.0] * m
        v[j] = a[j][j] - alpha
        for i in range(j + 1, m):
            v[i] = a[i][j]
        vv = sum(v[i] ** 2 for i in range(j, m))
        for c in range(j, k):
            f = 2.0 * sum(v[i] * a[i][c] for i in range(j, m)) / vv
            for i in range(j, m):
                a[i][c] -= f * v[i]
        f = 2.0 * sum(v[i] * b[i] for i in range(j, m)) / vv
        for i in range(j, m):
            b[i] -= f * v[i]
    x = [0.0] * k
    for j in reversed(range(k)):
        x[j] = (b[j] - sum(a[j][c] * x[c] for c in range(j + 1, k))) / a[j][j]
    return [x[j] / norms[j] for j in range(k)]


def _nnls(columns: list[list[float]], y: list[float]) -> list[float] | None:
    """Non-negative least squares with column 0 (the overhead) always in and > 0."""
    k = len(columns)
    best: tuple[float, list[float]] | None = None
    for size in range(k):
        for subset in itertools.combinations(range(1, k), size):
            support = [0, *subset]
            x = _lstsq([columns[j] for j in support], y)
            if x is None or x[0] <= 0.0 or min(x) < 0.0:
                continue
            full = [0.0] * k
            for j, value in zip(support, x, strict=True):
                full[j] = value
            residual = sum(
                (sum(full[j] * columns[j][i] for j in range(k)) - y[i]) ** 2 for i in range(len(y))
            )
            if best is None or residual < best[0]:
                best = (residual, full)
    return None if best is None else best[1]


def _significant(value: float) -> float:
    """SIGNIFICANT_DIGITS digits: more would be noise in a measured profile."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _features(shape: Shape) -> list[float]:
    return [
        1.0,
        float(shape.num_decode),
        float(shape.sum_context),
        float(max(shape.padding, 0)),
        float(shape.prefill_tokens),
        float(shape.prefill_pairs),
    ]


_TERMS = (
    "step_overhead_s",
    "per_sequence_s",
    "per_context_token_s",
    "padding (heterogeneity)",
    "per_prefill_token_s",
    "prefill_attention_s",
)


def fit(measurements: Sequence[Measurement]) -> FitResult:
    """The profile terms that best predict `measurements` (relative least squares)."""
    if not measurements:
        raise ValueError("no measurements to fit")
    rows = [_features(m.shape) for m in measurements]
    y = [1.0] * len(measurements)  # measured / measured: relative residuals
    weighted = [[v / m.time_s for v in row] for row, m in zip(rows, measurements, strict=True)]
    notes: list[str] = []
    # A term the grid never exercised stays 0 (and says so) instead of making A singular.
    used = [j for j in range(len(_TERMS)) if any(row[j] for row in rows)]
    notes += [
        f"{_TERMS[j]}: not measured by this grid, set to 0" for j in range(6) if j not in used
    ]
    columns = [[row[j] for row in weighted] for j in used]
    solution = _nnls(columns, y)
    x = [0.0] * 6
    if solution is not None:
        for j, value in zip(used, solution, strict=True):
            x[j] = value
    if solution is not None and x[3] > x[2]:
        # h would exceed 1: fit on the boundary h = 1, where S + padding = n * Lmax.
        notes.append(f"heterogeneity fitted {x[3] / max(x[2], 1e-300):.3g} > 1, refitted at 1")
        merged = [[row[0], row[1], row[2] + row[3], row[4], row[5]] for row in weighted]
        kept = [j for j in range(5) if any(row[j] for row in merged)]
        solution = _nnls([[row[j] for row in merged] for j in kept], y)
        x5 = [0.0] * 5
        if solution is not None:
            for j, value in zip(kept, solution, strict=True):
                x5[j] = value
        x = [x5[0], x5[1], x5[2], x5[2], x5[3], x5[4]]
    if solution is None:
        raise ValueError(
            "the measurements do not identify the cost terms with a positive step overhead "
            "(too few or degenerate points)"
        )
    heterogeneity = x[3] / x[2] if x[2] > 0 else 0.0
    coefficients = Coefficients(
        *(_significant(v) for v in (x[0], x[1], x[2], heterogeneity, x[4], x[5]))
    )
    notes += [f"{_TERMS[j]}: fitted 0 (non-negativity bound)" for j in used if x[j] == 0.0]
    points = tuple(
        PointFit(m.label, m.kind, m.shape, m.time_s, coefficients.predict(m.shape))
        for m in measurements
    )
    return FitResult(coefficients, points, tuple(notes))
