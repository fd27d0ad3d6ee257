//! The partitioner's inner step: the min-plus convolution `min_k f[k] + g[n - k]` of a DP row
//! `f` with a stage's cost curve `g`, for every `n` (docs/design/partitioner.md, "Fast min-plus
//! step").

/// Where a vector's finite values start and whether they run to its end.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct Support {
    pub lo: usize,
    pub is_suffix: bool,
}

impl Support {
    /// `None` when nothing is finite.
    pub fn of(v: &[f64]) -> Option<Support> {
        let lo = first_finite(v)?;
        Some(Support { lo, is_suffix: is_finite_suffix_from(v, lo) })
    }
}

pub(super) fn first_finite(v: &[f64]) -> Option<usize> {
    v.iter().position(|x| x.is_finite())
}

pub(super) fn is_finite_suffix_from(v: &[f64], start: usize) -> bool {
    v[start..].iter().all(|x| x.is_finite())
}

pub(super) fn is_convex(g: &[f64], start: usize) -> bool {
    g[start..].windows(3).all(|w| w[2] - w[1] >= w[1] - w[0] - 1e-12 * (1.0 + w[1].abs()))
}

/// A cost curve `g` with what the convolution needs to know about it.
pub(super) struct Curve<'a> {
    pub g: &'a [f64],
    pub support: Support,
    /// Convex on its finite values (the divide and conquer is exact then).
    pub is_convex: bool,
}

impl<'a> Curve<'a> {
    /// `None` when `g` is infinite everywhere.
    pub fn new(g: &'a [f64]) -> Option<Self> {
        let support = Support::of(g)?;
        Some(Curve { g, support, is_convex: support.is_suffix && is_convex(g, support.lo) })
    }
}

/// Leftmost argmin and value of `f[k] + g[n - k]` over `k` in `[k_lo, k_hi]` (`(inf, k_lo)`
/// when nothing is finite).
///
/// Four running minima over the residues of `k - k_lo` mod 4, so consecutive comparisons do
/// not wait on each other; each keeps its leftmost minimum, and the merge takes the least
/// value, then the least `k`: the same answer as one left-to-right scan.
#[inline]
pub(super) fn best_split(f: &[f64], g: &[f64], n: usize, k_lo: usize, k_hi: usize) -> (f64, usize) {
    let mut best = [(f64::INFINITY, k_lo); 4];
    let mut k = k_lo;
    while k + 3 <= k_hi {
        for (lane, slot) in best.iter_mut().enumerate() {
            let v = f[k + lane] + g[n - k - lane];
            if v < slot.0 {
                *slot = (v, k + lane);
            }
        }
        k += 4;
    }
    for (lane, k) in (k..=k_hi).enumerate() {
        let v = f[k] + g[n - k];
        if v < best[lane].0 {
            best[lane] = (v, k);
        }
    }
    best.into_iter().reduce(|a, b| if b.0 < a.0 || (b.0 == a.0 && b.1 < a.1) { b } else { a }).expect("four lanes")
}

/// Computes `min_k f[k] + g[n - k]` and its leftmost argmin `k` for every `n` in `0..=n_max`
/// where some term is finite, and hands each to `relax(n, value, k)` exactly once.
///
/// When `g` is convex on its finite suffix and `f` finite on a suffix, the matrix
/// `f[k] + g[n-k]` is Monge, so the leftmost argmin is non-decreasing in `n` and a divide and
/// conquer finds all row minima in O(N log N); otherwise the plain O(N^2) scan. `stack` is
/// scratch space, kept by the caller across calls.
pub(super) fn min_plus(
    f: &[f64],
    f_support: Support,
    curve: &Curve<'_>,
    n_max: usize,
    stack: &mut Vec<(usize, usize, usize, usize)>,
    mut relax: impl FnMut(usize, f64, usize),
) {
    let (f_lo, g_lo, g) = (f_support.lo, curve.support.lo, curve.g);
    if f_lo + g_lo > n_max {
        return;
    }
    if !(f_support.is_suffix && curve.is_convex) {
        for n in f_lo + g_lo..=n_max {
            let (v, k) = best_split(f, g, n, f_lo, n - g_lo);
            relax(n, v, k);
        }
        return;
    }
    // Explicit stack of (n_lo, n_hi, k_lo, k_hi) ranges.
    stack.clear();
    stack.push((f_lo + g_lo, n_max, f_lo, n_max - g_lo));
    while let Some((n_lo, n_hi, k_lo, k_hi)) = stack.pop() {
        let mid = (n_lo + n_hi) / 2;
        let (v, k) = best_split(f, g, mid, k_lo, k_hi.min(mid - g_lo));
        relax(mid, v, k);
        if mid > n_lo {
            stack.push((n_lo, mid - 1, k_lo, k));
        }
        if mid < n_hi {
            stack.push((mid + 1, n_hi, k, k_hi));
        }
    }
}

/// `out[n] = min_k f[k] + g[n-k]` with the chosen `k` in `arg[n]`, only where it improves `out`.
#[cfg(test)]
pub(super) fn min_plus_into(f: &[f64], g: &[f64], out: &mut [f64], arg: &mut [usize]) {
    let (Some(f_support), Some(curve)) = (Support::of(f), Curve::new(g)) else { return };
    min_plus(f, f_support, &curve, out.len() - 1, &mut Vec::new(), |n, v, k| {
        if v < out[n] {
            out[n] = v;
            arg[n] = k;
        }
    });
}
